"""Short causal conv: against its per-token definition in float64, and streaming."""

import torch
import torch.nn.functional as F

from muse.layers.short_conv import ShortConv


def test_matches_the_per_token_definition_and_streams():
    torch.manual_seed(0)
    conv = ShortConv(6, kernel_size=4).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    w = conv.conv.weight[:, 0]  # (C, K): tap K−1 is the current token
    ref = torch.stack([
        F.silu(sum(w[:, 3 - i] * x[:, t - i] for i in range(4) if t - i >= 0))
        for t in range(11)
    ], dim=1)
    assert torch.allclose(conv(x), ref, rtol=1e-12, atol=1e-12)
    tail = conv.init_tail(2)
    ya, tail = conv(x[:, :2], tail)  # a segment shorter than the kernel
    yb, tail = conv(x[:, 2:], tail)
    assert torch.allclose(torch.cat((ya, yb), dim=1), ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(tail, x[:, -3:])
