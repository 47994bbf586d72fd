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
    ({"decay": "retnet"}, "decay must be one of"),
    ({"decay": "mamba2", "decay_dt_range": [0.1, 0.0]}, "dt_range must be 0 < low"),
    ({"decay_plain_heads": 2}, r"decay_plain_heads \(2\) needs decay 'mamba2' and fewer than "
                               r"n_heads \(2\)"),
    ({"decay": "none"}, "got decay 'none'"),
    ({"decay_plain_heads": -1}, "decay_plain_heads must be an integer ≥ 0"),
])
def test_bad_config_names_the_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.build("phase8", "tiny", **overrides)




def test_the_default_decays_the_plain_presets_do_not_and_it_streams_exactly():
    import torch

    assert models.build("phase8", "tiny-plain", vocab_size=97).blocks[0].attn.gamma is None
    torch.manual_seed(0)
    m = models.build("phase8", "tiny", vocab_size=97).double().eval()
    assert m.blocks[0].attn.gamma is not None and m.config.decay_dt_range == (1e-3, 0.1)
    assert m.blocks[0].attn.plain_heads == 1
    assert models.build("phase8", "tiny-longdecay").blocks[0].attn.plain_heads == 0
    ids = torch.randint(0, 97, (2, 45))
    whole = m(ids)
    state = m.init_state(2)
    a, state = m(ids[:, :20], state)
    b, _ = m(ids[:, 20:], state)
    torch.testing.assert_close(torch.cat((a, b), 1), whole, rtol=0, atol=1e-9)
