"""Phase 8 specifics beyond the contract: matched baselines, the read-out options, the
long-range gradient."""

import pytest

from muse import models


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
    ({"local_window": -1}, "local_window must be an integer ≥ 0"),
    ({"local_window": 8, "local_heads": 0}, "local_heads must be a positive integer"),
])
def test_bad_config_names_the_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.build("phase8", "tiny", **overrides)


