"""Phase 2 specifics beyond the contract."""

import pytest
import torch

from muse import models
from muse.measure.gradient import gradient_flow
from muse.measure.phases import random_ids


def count(name, preset):
    with torch.device("meta"):
        return models.build(name, preset).num_params()


@pytest.mark.parametrize("preset", ["small", "base", "large"])
def test_matched_transformer_within_ten_percent(preset):
    base_name, base_preset = models.baseline_for("phase2", preset)
    ours, theirs = count("phase2", preset), count(base_name, base_preset)
    assert abs(theirs / ours - 1) < 0.10, (preset, ours, theirs)


def test_every_block_changes_its_input():
    torch.manual_seed(0)
    m = models.build("phase2", "tiny", vocab_size=97).double().eval()
    x = m.embed(random_ids(97, 2, 33, "cpu"))
    for block in m.blocks:
        y = block(x)
        assert (y - x).abs().max() > 1e-6
        x = y


def test_long_range_gradient_reaches_the_first_token_at_1024():
    torch.manual_seed(0)
    m = models.build("phase2", "tiny", vocab_size=97)
    flow = gradient_flow(m, random_ids(97, 1, 1024, "cpu"), torch.float32)
    assert flow.finite and flow.long_range_grad_norm > 0


def test_bk_zero_out_starts_as_the_model_without_bk_and_still_learns_it():
    torch.manual_seed(0)
    m = models.build("phase2", "tiny", vocab_size=97, bk_zero_out=True, init="gpt2").double()
    ids = random_ids(97, 2, 33, "cpu")
    x = m.embed(ids)
    block = m.blocks[0]
    assert torch.equal(block.bk(block.ln_bk(x)), torch.zeros_like(x))
    m(ids).sum().backward()
    # the zero projection gets a gradient, so training moves BK off zero
    assert block.bk.out.weight.grad.abs().max() > 0


def test_bk_options_need_the_bk_sublayer():
    models.build("phase2", "tiny", bk_mixer=False)
    with pytest.raises(ValueError, match="bk_zero_out"):
        models.build("phase2", "tiny", bk_zero_out=False, bk_mixer=False)
