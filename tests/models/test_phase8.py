"""Phase 8 specifics beyond the contract: matched baselines, the read-out options, the
long-range gradient."""

import pytest
import torch

from muse import models
from muse.measure.gradient import gradient_flow
from muse.measure.phases import random_ids


def count(name, preset, **overrides):
    with torch.device("meta"):
        return models.build(name, preset, **overrides).num_params()


@pytest.mark.parametrize("vocab", [50257, 8192])
@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_matched_transformer_within_ten_percent(preset, vocab):
    base_name, base_preset = models.baseline_for("phase8", preset, vocab)
    ours = count("phase8", preset, vocab_size=vocab)
    theirs = count(base_name, base_preset, vocab_size=vocab)
    assert abs(theirs / ours - 1) < 0.10, (preset, vocab, ours, base_preset, theirs)


def test_plain_linear_attention_has_no_conv_and_no_gate():
    m = models.build("phase8", "tiny", vocab_size=97, conv=0, out_gate=False)
    attn = m.blocks[0].attn
    assert attn.conv is None and attn.gate is None and attn.head_gain is None
    default = models.build("phase8", "tiny", vocab_size=97).blocks[0].attn
    assert default.conv is not None and default.gate is not None


@pytest.mark.parametrize("overrides, match", [
    ({"backend": "triton"}, "backend must be one of"),
    ({"conv": -1}, "conv must be an integer"),
    ({"init": "xavier"}, "init must be one of"),
    ({"chunk": 0}, "chunk must be a positive integer"),
])
def test_bad_config_names_the_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.build("phase8", "tiny", **overrides)


def test_every_block_changes_its_input():
    torch.manual_seed(0)
    m = models.build("phase8", "tiny", vocab_size=97).double().eval()
    x = m.embed(random_ids(97, 2, 33, "cpu"))
    for block in m.blocks:
        y = block(x)
        assert (y - x).abs().max() > 1e-6
        x = y


def test_long_range_gradient_reaches_the_first_token_at_1024():
    torch.manual_seed(0)
    m = models.build("phase8", "tiny", vocab_size=97)
    flow = gradient_flow(m, random_ids(97, 1, 1024, "cpu"), torch.float32)
    assert flow.finite and flow.long_range_grad_norm > 0
