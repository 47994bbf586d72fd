"""muse.measure.decode: the bytes of a carried state, and decoding after prompts of two lengths:
a MUSE family's state keeps its size, the transformer's KV cache holds exactly 2 × layers × D
values per token."""

import torch

from muse import models
from muse.measure.decode import measure_decode, state_bytes
from muse.models.common import StreamState

CPU = torch.device("cpu")


def test_state_bytes_counts_every_tensor_once():
    t = torch.zeros(3, 4)  # 48 bytes in float32
    nested = StreamState(1, [{"a": t, "b": {"c": t.double()}}, {"d": [t.half(), t]}])
    assert state_bytes(nested) == 48 + 96 + 24 + 48
    assert state_bytes({"none": None, "n": 3}) == 0


def test_a_recurrent_state_keeps_its_size_and_a_kv_cache_grows_per_token():
    torch.manual_seed(0)
    muse = models.build("phase2", "tiny")
    short, long = (measure_decode(muse, n, 3, CPU, torch.float32, segment=32) for n in (20, 90))
    assert short.state_bytes == long.state_bytes > 0
    assert short.new_tokens == 3 and short.seconds > 0 and short.peak_bytes is None
    cfg = (tf := models.build("transformer", "tiny")).config
    for n in (20, 90):
        # keys and values of every prompt token in every layer, float32
        expected = 2 * cfg.n_layers * cfg.d_model * n * 4
        assert measure_decode(tf, n, 2, CPU, torch.float32, segment=32).state_bytes == expected


def test_every_family_decodes_under_low_precision_autocast():
    """The bench decodes in inference mode under autocast: the shared autocast copies
    (layers.cast) and every family's streaming path have to run there."""
    for name in models.default_names():  # the fla peers do not stream
        torch.manual_seed(0)
        model = models.build(name, "tiny")
        stats = measure_decode(model, 40, 2, CPU, torch.bfloat16, segment=16)
        assert stats.new_tokens == 2 and stats.state_bytes > 0, name
