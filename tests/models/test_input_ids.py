"""Token ids at a model's entry: a bad id is named, whatever the family, before any lookup."""

import pytest
import torch

from muse import models
from muse.errors import MuseError
from muse.models.common import check_input_ids

FAMILIES = ["transformer:tiny", "transformer-eager:tiny", "phase1:tiny", "phase2:tiny"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    name, preset = request.param.split(":")
    return models.build(name, preset, vocab_size=256).eval()


@pytest.mark.parametrize("ids, words", [
    ([[1, 2, 256, 3]], "token id 256 at [0, 2] is out of range: ids must lie in [0, 256)"),
    ([[1, 2], [3, -1]], "token id -1 at [1, 1] is out of range"),
    ([[1, 2], [3, 10**6]], "token id 1000000 at [1, 1]"),
])
def test_an_id_out_of_range_is_named(model, ids, words):
    with pytest.raises(MuseError) as info:
        model(torch.tensor(ids))
    assert words in str(info.value)


@pytest.mark.parametrize("ids, dtype", [
    ([[1.0, 2.0]], "torch.float32"), ([[True, False]], "torch.bool"),
])
def test_float_and_bool_ids_are_refused(model, ids, dtype):
    with pytest.raises(TypeError, match=f"integer token ids, got dtype {dtype}"):
        model(torch.tensor(ids))


def test_a_batch_of_zero_is_refused(model):
    with pytest.raises(MuseError, match=r"at least one sequence, got batch 0 \(shape \(0, 4\)\)"):
        model(torch.zeros(0, 4, dtype=torch.long))


def test_good_ids_of_any_integer_dtype_pass(model):
    ids = torch.tensor([[0, 255, 7]])
    reference = model(ids)
    assert torch.equal(model(ids.to(torch.int32)), reference)


def test_off_the_cpu_the_range_is_read_only_when_asked(monkeypatch):
    # a meta tensor has no values: reading them fails, so a pass means nothing was read (on a
    # GPU, no host sync)
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    check_input_ids(ids, vocab_size=256)
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_input_ids(ids, vocab_size=256, validate=True)
    monkeypatch.setenv("MUSE_VALIDATE_IDS", "1")
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_input_ids(ids, vocab_size=256)
    cpu = torch.tensor([[5, 300]])
    check_input_ids(cpu, vocab_size=256, validate=False)  # skipped when told
    with pytest.raises(MuseError, match="token id 300"):
        check_input_ids(cpu, vocab_size=256)
