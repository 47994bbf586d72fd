"""Planar complex layers against torch.complex128 (float64 planes; 1e-12 unless stated), the
recurrence layer against its per-token loop, and streaming of the recurrence."""

import pytest
import torch

from muse.layers.complex import (
    ComplexDiagonalRecurrence,
    ComplexEmbedding,
    ComplexLayerNorm,
    ComplexLinear,
    ModReLU,
    RealPart,
    complex_layer_norm_reference,
    complex_linear_reference,
    from_planar,
    modrelu_reference,
    to_planar,
)
from muse.ops.complex_scan import complex_recurrence_naive

TOL = 1e-12


def z(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.complex128, generator=g)


def check(planar_out, complex_out, tol=TOL):
    torch.testing.assert_close(from_planar(planar_out), complex_out, rtol=0, atol=tol)


def test_planar_round_trip():
    a = z(3, 5)
    assert torch.equal(from_planar(to_planar(a)), a)
    assert to_planar(a, torch.bfloat16).dtype == torch.bfloat16


def test_complex_linear_is_the_complex_product():
    torch.manual_seed(0)
    layer = ComplexLinear(7, 5).double()
    with torch.no_grad():
        layer.bias.normal_()
    a = z(2, 3, 7)
    check(layer(to_planar(a)), complex_linear_reference(a, layer))
    torch.testing.assert_close(complex_linear_reference(a, layer),
                               a @ layer.complex_weight().T + from_planar(layer.bias))


def test_modrelu_keeps_the_phase_and_thresholds_the_modulus():
    layer = ModReLU(6).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([-0.5, -2.0, 0.0, 0.3, -0.1, 1.0]))
    a = z(4, 6)
    a[0, 0] = 0  # exactly zero: output 0, gradient finite
    x = to_planar(a).requires_grad_()
    out = layer(x)
    check(out, modrelu_reference(a, layer))
    assert from_planar(out)[0, 0] == 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.bias.grad).all()


def test_complex_layer_norm():
    torch.manual_seed(0)
    layer = ComplexLayerNorm(8).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.normal_()
    a = 3 + 2j + 5 * z(2, 4, 8)
    check(layer(to_planar(a)), complex_layer_norm_reference(a, layer))
    # a common phase passes through: LN(e^{iφ} z) = e^{iφ} LN(z) with no shift
    with torch.no_grad():
        layer.bias.zero_()
    rot = torch.exp(torch.tensor(0.7j, dtype=torch.complex128))
    check(layer(to_planar(rot * a)), rot * from_planar(layer(to_planar(a))))


def test_embedding_has_two_tables_and_the_head_reads_the_real_plane():
    emb = ComplexEmbedding(11, 4).double()
    ids = torch.tensor([[1, 5, 10]])
    out = emb(ids)
    assert out.shape == (1, 3, 8)
    assert torch.equal(out[..., :4], emb.real.weight[ids])
    assert torch.equal(out[..., 4:], emb.imag.weight[ids])
    assert torch.equal(RealPart()(out), emb.real.weight[ids])


def recurrence(seed=0):
    torch.manual_seed(seed)
    return ComplexDiagonalRecurrence(5, 7, chunk=4, max_phase=3.0).double()


def reference(layer, a, h0=None):
    log_mag, angle = layer.log_decay()
    lam = torch.exp(torch.complex(log_mag, angle))
    gain = torch.sqrt(1 - lam.abs() ** 2)
    return complex_recurrence_naive(complex_linear_reference(a, layer.proj_in) * gain, lam, h0)


@pytest.mark.parametrize("n", [1, 3, 4, 9, 33])
def test_recurrence_equals_its_per_token_loop(n):
    layer = recurrence()
    a = z(2, n, 5)
    check(layer(to_planar(a)), reference(layer, a))


def test_recurrence_streams_exactly_and_its_gradient_matches_the_loop():
    layer = recurrence()
    a = z(2, 30, 5)
    x = to_planar(a)
    whole = layer(x)
    first, h = layer(x[:, :13], torch.zeros(2, 14, dtype=torch.float64))
    second, h2 = layer(x[:, 13:], h)
    torch.testing.assert_close(torch.cat((first, second), 1), whole, rtol=0, atol=TOL)
    torch.testing.assert_close(h2, whole[:, -1], rtol=0, atol=TOL)
    w = torch.randn(2, 30, 7, dtype=torch.complex128)
    params = list(layer.parameters())
    got = torch.autograd.grad((from_planar(whole) * w.conj()).real.sum(), params)
    want = torch.autograd.grad((reference(layer, a) * w.conj()).real.sum(), params)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_recurrence_is_stable_at_init():
    # |λ| < 1 on every channel and the LRU gain keeps the state at the input's scale
    layer = ComplexDiagonalRecurrence(16, 32)
    log_mag, _ = layer.log_decay()
    assert (log_mag < 0).all()
    x = torch.randn(4, 2048, 32)
    h = layer(x)
    u = layer.proj_in(x)
    ratio = h.pow(2).mean().sqrt() / u.pow(2).mean().sqrt()
    assert 0.3 < ratio < 3, ratio


def selective_recurrence(seed=0):
    torch.manual_seed(seed)
    layer = ComplexDiagonalRecurrence(5, 7, chunk=4, max_phase=3.0, selective_rank=3).double()
    with torch.no_grad():  # off the zero init: the decays depend on the input
        layer.select[1].weight.normal_(std=0.5)
    return layer


def selective_reference(layer, a):
    log_mag, angle = layer.log_decay(to_planar(a))
    lam = torch.exp(torch.complex(log_mag, angle.expand_as(log_mag)))
    gain = torch.sqrt(1 - lam.abs() ** 2)
    return complex_recurrence_naive(complex_linear_reference(a, layer.proj_in) * gain, lam)


@pytest.mark.parametrize("n", [1, 9, 33])
def test_selective_recurrence_equals_its_per_token_loop(n):
    layer = selective_recurrence()
    a = z(2, n, 5)
    check(layer(to_planar(a)), selective_reference(layer, a))


def test_selective_recurrence_streams_exactly_and_its_gradients_match_the_loop():
    """Whole and in two segments (the carried state enters the gated scan's first step), values
    and the gradients of the weights and the input against autograd through the loop."""
    layer = selective_recurrence()
    a = z(2, 30, 5)
    x = to_planar(a).requires_grad_()
    whole = layer(x)
    first, h = layer(x[:, :13], torch.zeros(2, 14, dtype=torch.float64))
    second, h2 = layer(x[:, 13:], h)
    streamed = torch.cat((first, second), 1)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=TOL)
    torch.testing.assert_close(h2, whole[:, -1], rtol=0, atol=TOL)
    w = torch.randn(2, 30, 7, dtype=torch.complex128)
    leaves = [x, *layer.parameters()]
    want = torch.autograd.grad((selective_reference(layer, a) * w.conj()).real.sum(), leaves[1:])
    want_x = torch.autograd.grad((from_planar(whole) * w.conj()).real.sum(), x, retain_graph=True)
    for out in (whole, streamed):
        got = torch.autograd.grad((from_planar(out) * w.conj()).real.sum(), leaves,
                                  retain_graph=True)
        for g, r in zip(got, [*want_x, *want], strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_selective_recurrence_keeps_its_projection_shift_and_planes_only():
    """Under bf16 autocast, beyond what its two projections keep and its weights: the bf16 shift
    and projection and the float32 scanned planes, 2 + 4 + 8 bytes a token per state channel
    (autograd through the decays, gain and u kept 44: the float32 copies besides)."""
    layer = ComplexDiagonalRecurrence(16, 32, selective_rank=4)
    inside = []  # non-empty while a projection runs (the hooks return None: outputs unchanged)
    for m in (layer.select, layer.proj_in):
        m.register_forward_pre_hook(lambda *_: inside.append(True))
        m.register_forward_hook(lambda *_: inside.clear())
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if not inside and ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    bsz, n = 2, 64
    x = torch.randn(bsz, n, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert sum(kept.values()) == 14 * 32 * bsz * n


# the formulations before ModReLU and the LN became one autograd node each: plain ops, autograd
# through every step (what the nodes' values and gradients are bound to)


def modrelu_plain(x, bias, gate=None):
    p = x.unflatten(-1, (2, x.shape[-1] // 2))
    sq = p.pow(2).sum(dim=-2)
    nonzero = sq > 0
    mod = torch.sqrt(torch.where(nonzero, sq, 1))
    scale = torch.where(nonzero, torch.relu(mod + bias.to(mod.dtype)) / mod, 0)
    y = (p * scale.unsqueeze(-2)).flatten(-2)
    if gate is None:
        return y
    g = torch.nn.functional.silu(gate)
    return y * torch.cat((g, g), dim=-1).to(y.dtype)


def layer_norm_plain(x, layer):
    p = x.unflatten(-1, (2, x.shape[-1] // 2))
    p = p - p.mean(dim=-1, keepdim=True)
    wide = torch.promote_types(p.dtype, torch.float32)
    sq = torch.linalg.vector_norm(p, dim=(-2, -1), keepdim=True, dtype=wide).pow(2)
    scale = torch.rsqrt(sq / layer.features + layer.eps).to(p.dtype)
    return (p * scale * layer.weight.to(p.dtype)).flatten(-2) + layer.bias.to(p.dtype)


def _modrelu_inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 12, generator=g, dtype=dtype)
    x[0, 0, [1, 7]] = 0  # channel 1 exactly zero
    layer = ModReLU(6).to(dtype)
    with torch.no_grad():  # channels off (|z| + b ≤ 0 for most), on, and in between
        layer.bias.copy_(torch.tensor([-0.5, -2.0, 0.0, 0.3, -1.0, 1.0]))
    gate = torch.randn(3, 7, 6, generator=g, dtype=dtype)
    return x, layer, gate


@pytest.mark.parametrize("gated", [False, True])
def test_modrelu_node_equals_the_plain_ops_with_gradients(gated):
    x, layer, gate = _modrelu_inputs()
    w = torch.randn(3, 7, 12, dtype=torch.float64)
    leaves = [x.requires_grad_(), layer.bias, *([gate.requires_grad_()] if gated else [])]
    runs = []
    for fn in (lambda: layer(x, gate if gated else None),
               lambda: modrelu_plain(x, layer.bias, gate if gated else None)):
        out = fn()
        runs.append([out.detach(), *torch.autograd.grad((out * w).sum(), leaves)])
    for got, want in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (runs[0][1][0, 0, [1, 7]] == 0).all()  # z = 0: zero gradient, as the plain ops


def test_modrelu_node_values_are_the_plain_ops_bit_for_bit_in_bf16():
    x, layer, gate = _modrelu_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb, gb = x.to(torch.bfloat16), gate.to(torch.bfloat16)
        for g in (None, gb):
            assert torch.equal(layer(xb, g), modrelu_plain(xb, layer.bias, g))


def _kept_bytes(fn, params):
    weights = {p.untyped_storage().data_ptr() for p in params}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        fn()
    return sum(kept.values())


def test_gated_modrelu_keeps_its_input_and_the_gate_logit_only():
    """bf16, D complex channels: the planes (4 bytes a channel) and the logit (2): 6·D bytes a
    token, where autograd through the plain ops kept 21·D (|z|, its mask, ReLU(|z| + b), the
    scale, the ungated output and the doubled SiLU besides)."""
    n, d = 64, 16
    layer = ModReLU(d)
    x = torch.randn(1, n, 2 * d, dtype=torch.bfloat16, requires_grad=True)
    gate = torch.randn(1, n, d, dtype=torch.bfloat16, requires_grad=True)
    assert _kept_bytes(lambda: layer(x, gate), [layer.bias]) == 6 * d * n
    assert _kept_bytes(lambda: modrelu_plain(x, layer.bias, gate), [layer.bias]) == 21 * d * n


def _layer_norm(dtype=torch.float64):
    torch.manual_seed(0)
    layer = ComplexLayerNorm(8).to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.normal_()
    return layer


def test_complex_layer_norm_node_equals_the_plain_ops_with_gradients():
    layer = _layer_norm()
    x = to_planar(3 + 2j + 5 * z(2, 4, 8)).requires_grad_()
    w = torch.randn(2, 4, 16, dtype=torch.float64)
    leaves = [x, *layer.parameters()]
    runs = []
    for fn in (lambda: layer(x), lambda: layer_norm_plain(x, layer)):
        out = fn()
        runs.append([out.detach(), *torch.autograd.grad((out * w).sum(), leaves)])
    for got, want in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_layer_norm_node_values_are_the_plain_ops_bit_for_bit(dtype):
    layer = _layer_norm(torch.float32)
    x = to_planar(3 + 2j + 5 * z(2, 4, 8)).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), layer_norm_plain(x, layer))


def test_complex_layer_norm_keeps_its_input_and_the_statistics_only():
    """A float32 stream of D complex channels: x (8·D bytes a token), the two plane means and
    the inverse deviation (12), where autograd through the plain ops kept the centred planes
    and their scaled copy (16·D) and the statistics."""
    n, d = 64, 16
    layer = ComplexLayerNorm(d)
    x = torch.randn(1, n, 2 * d, requires_grad=True)
    params = list(layer.parameters())
    assert _kept_bytes(lambda: layer(x), params) == (8 * d + 12) * n
    assert _kept_bytes(lambda: layer_norm_plain(x, layer), params) == (16 * d + 8) * n
