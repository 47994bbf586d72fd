"""Short causal conv: against its per-token definition in float64, and streaming."""

import pytest
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


def _composed(conv, x, tail=None):
    """The reference form: nn.Conv1d (cuDNN's or ATen's depthwise kernel), then SiLU, each by
    autograd."""
    padded = F.pad(x, (0, 0, 3, 0)) if tail is None else torch.cat((tail.to(x.dtype), x), 1)
    return F.silu(conv.conv(padded.transpose(1, 2)).transpose(1, 2))


# float64: only the order of K products differs; bf16: the conv's output is rounded to bf16
# (2⁻⁸ relative) in both, from sums in float32 taken in different orders
TOLERANCE = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.bfloat16: dict(rtol=2e-2,
                                                                                atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("streamed", [False, True])
def test_shifted_sums_equal_conv1d_then_silu_by_autograd(dtype, streamed):
    """Output and ∂x, ∂tail, ∂weight as autograd through Conv1d then SiLU: in float64, and
    under bf16 autocast from a float32 weight and a bf16 input (as phase2's qkv gives it)."""
    torch.manual_seed(1)
    conv = ShortConv(6, kernel_size=4).double() if dtype == torch.float64 else ShortConv(6, 4)
    x0 = torch.randn(2, 13, 6, dtype=dtype)
    t0 = torch.randn(2, 3, 6, dtype=dtype) if streamed else None
    up = torch.randn(2, 13, 6, dtype=torch.float64)
    runs = []
    def one_node(x, t):
        return conv(x) if t is None else conv(x, t)[0]

    for fn in (one_node, lambda x, t: _composed(conv, x, t)):
        conv.zero_grad()
        x = x0.clone().requires_grad_()
        t = None if t0 is None else t0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float64):
            y = fn(x, t)
        (y.double() * up).sum().backward()
        runs.append([y, x.grad, conv.conv.weight.grad] + ([] if t is None else [t.grad]))
    for a, b in zip(*runs, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), **TOLERANCE[dtype])


def test_keeps_the_padded_input_not_the_conv_output():
    """bf16 autocast, what backward keeps: the padded input and the bf16 weight (C·K), not also
    the conv's output for SiLU's backward (the composed form keeps both: 2·N·C·2 bytes)."""
    conv = ShortConv(8, kernel_size=4)
    x = torch.randn(1, 32, 8, dtype=torch.bfloat16, requires_grad=True)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for fn, want in ((conv, (32 + 3) * 8 * 2 + 8 * 4 * 2),
                     (lambda x: _composed(conv, x), (32 + 3) * 8 * 2 + 8 * 4 * 2 + 32 * 8 * 2)):
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            fn(x)
        assert sum(kept.values()) == want
