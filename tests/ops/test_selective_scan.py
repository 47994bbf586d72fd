"""The selective scans (a decay per step and channel) against their per-token definitions in
float64: the real chunked form at lengths that take it one, two and three levels deep, and the
complex one, whose rotation e^{iθt} comes out of the scan exactly (1e-10: only the summation
order differs)."""

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from muse.ops.complex_scan import complex_recurrence_naive
from muse.ops.complex_scan.selective import complex_gated_selective_scan, complex_selective_scan
from muse.ops.decayed_scan.chunk import selective_cumsum

from .interpreted import run_interpreted

TOL = 1e-10


def _loop(u, log_decay):
    s, rows = torch.zeros_like(u[:, 0]), []
    for t in range(u.shape[1]):
        s = torch.exp(log_decay[:, t]) * s + u[:, t]
        rows.append(s)
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("n, chunk", [(1, 4), (5, 4), (16, 4), (17, 4), (100, 4), (300, 16)])
def test_selective_cumsum_equals_the_loop(n, chunk):
    g = torch.Generator().manual_seed(n)
    u = torch.randn(2, n, 3, generator=g, dtype=torch.float64)
    log_a = -torch.rand(2, n, 3, generator=g, dtype=torch.float64) * 0.2
    log_a[..., 0] = -1e-6  # a channel that barely forgets
    torch.testing.assert_close(selective_cumsum(u, log_a, chunk), _loop(u, log_a),
                               rtol=0, atol=TOL)


def test_selective_cumsum_gradients_match_the_loop():
    g = torch.Generator().manual_seed(0)
    u, up = (torch.randn(2, 37, 3, generator=g, dtype=torch.float64) for _ in range(2))
    log_a = -torch.rand(2, 37, 3, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda a, b: selective_cumsum(a, b, 4), _loop):
        leaves = [t.clone().requires_grad_() for t in (u, log_a)]
        (fn(*leaves) * up).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("n", [1, 9, 70])
def test_complex_selective_scan_equals_the_per_token_recurrence(n):
    g = torch.Generator().manual_seed(n)
    r = 4
    u = torch.complex(*(torch.randn(2, n, r, generator=g, dtype=torch.float64) for _ in range(2)))
    log_mag = -torch.rand(2, n, r, generator=g, dtype=torch.float64) * 0.3
    angle = torch.rand(r, generator=g, dtype=torch.float64) * math.pi
    want = complex_recurrence_naive(u, torch.exp(torch.complex(log_mag, angle.expand(2, n, r))))
    planar = torch.cat((u.real, u.imag), dim=-1)
    got = complex_selective_scan(planar, log_mag, angle)
    torch.testing.assert_close(torch.complex(got[..., :r], got[..., r:]), want, rtol=0, atol=TOL)


@pytest.mark.parametrize("n", [1, 9, 70])
def test_complex_selective_scan_gradients_match_the_per_token_recurrence(n):
    """Its backward is written by hand (one autograd node): ∂u, ∂log|λ| and ∂θ against autograd
    through the complex128 loop."""
    g = torch.Generator().manual_seed(100 + n)
    bsz, r = 2, 4
    planes = torch.randn(bsz, n, 2 * r, generator=g, dtype=torch.float64)
    log_mag = -torch.rand(bsz, n, r, generator=g, dtype=torch.float64) * 0.3
    angle = torch.rand(r, generator=g, dtype=torch.float64) * math.pi
    up = torch.randn(bsz, n, 2 * r, generator=g, dtype=torch.float64)

    def loop(u, lm, th):
        z = torch.complex(u[..., :r], u[..., r:])
        h = complex_recurrence_naive(z, torch.exp(torch.complex(lm, th.expand(bsz, n, r))))
        return torch.cat((h.real, h.imag), dim=-1)

    grads = []
    for fn in (complex_selective_scan, loop):
        leaves = [t.clone().requires_grad_() for t in (planes, log_mag, angle)]
        (fn(*leaves) * up).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("u", "log_mag", "angle"), *grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL * max(1.0, n / 10), msg=name)


def test_complex_selective_scan_keeps_its_inputs_and_the_scanned_planes_only():
    """What autograd keeps for backward: u in its own dtype, the decays, θ and the float32
    planes g — not the float32 copies of u, the rotations or the turned input."""
    bsz, n, r = 1, 64, 8
    u = torch.randn(bsz, n, 2 * r, dtype=torch.bfloat16, requires_grad=True)
    log_mag = (-torch.rand(bsz, n, r)).requires_grad_()
    angle = torch.rand(r, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        complex_selective_scan(u, log_mag, angle)
    assert sorted(t.numel() * t.element_size() for t in kept) == sorted(
        [r * 4, bsz * n * r * 4, bsz * n * 2 * r * 2, 2 * bsz * n * r * 4])


def _unfused(p, z, angle, bias, carry=None):
    """What phase3's selective layer composed before the gated node: the decays, the LRU gain and
    u by autograd, then complex_selective_scan."""
    log_mag = -F.softplus(bias + z.to(torch.promote_types(z.dtype, torch.float32)))
    gain = torch.sqrt(-torch.expm1(2 * log_mag))
    u = p * torch.cat((gain, gain), dim=-1)
    if carry is not None:
        u = torch.cat((u[:, :1] + carry[:, None], u[:, 1:]), dim=1)
    return complex_selective_scan(u, log_mag, angle)


@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("n", [1, 9, 70])
def test_the_gated_scan_equals_the_unfused_composition(n, carried):
    """h and ∂p, ∂z, ∂θ, ∂bias, ∂carry against autograd through the unfused ops in float64: the
    decays' and gain's chain rule written by hand, down to a channel that barely forgets (gain
    ~3e-3, where ∂gain/∂log|λ| is ~300)."""
    g = torch.Generator().manual_seed(200 + n)
    bsz, r = 2, 4
    p = torch.randn(bsz, n, 2 * r, generator=g, dtype=torch.float64)
    z = torch.randn(bsz, n, r, generator=g, dtype=torch.float64) * 2 - 2
    z[..., 0] = -12.0
    angle = torch.rand(r, generator=g, dtype=torch.float64) * math.pi
    bias = torch.randn(r, generator=g, dtype=torch.float64)
    carry = torch.randn(bsz, 2 * r, generator=g, dtype=torch.float64) if carried else None
    up = torch.randn(bsz, n, 2 * r, generator=g, dtype=torch.float64)
    inputs = [t for t in (p, z, angle, bias, carry) if t is not None]
    outs, grads = [], []
    for fn in (complex_gated_selective_scan, _unfused):
        leaves = [t.clone().requires_grad_() for t in inputs]
        h = fn(*leaves)
        (h * up).sum().backward()
        outs.append(h.detach())
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=TOL)
    names = ("p", "z", "angle", "bias", "carry")[: len(inputs)]
    for name, a, b in zip(names, *grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL * max(1.0, n / 10), msg=name)


def _kept_bytes(fn, *inputs) -> list[int]:
    """The bytes of each storage autograd keeps while fn(*inputs) runs."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sorted(kept.values())


def test_the_gated_scan_keeps_p_z_and_the_scanned_planes_only():
    """Under bf16 autocast (p and z bf16, ν and θ float32) the node keeps p and z in their own
    dtype and the float32 planes g: 14 bytes a token per channel, where the unfused composition
    keeps 44 (the softplus input, expm1 and sqrt outputs, gain, u and log|λ| in float32 besides)."""
    bsz, n, r = 1, 64, 8
    p = torch.randn(bsz, n, 2 * r, dtype=torch.bfloat16, requires_grad=True)
    z = (torch.randn(bsz, n, r) - 3).to(torch.bfloat16).requires_grad_()
    angle, bias = (torch.rand(r, requires_grad=True) for _ in range(2))
    fused = _kept_bytes(complex_gated_selective_scan, p, z, angle, bias)
    assert fused == sorted([r * 4, r * 4, bsz * n * r * 2, bsz * n * 2 * r * 2,
                            2 * bsz * n * r * 4])
    per_token = [sum(b for b in kept if b > r * 4) / (bsz * n * r)
                 for kept in (fused, _kept_bytes(_unfused, p, z, angle, bias))]
    assert per_token == [14, 44]


_TRITON_PATH = textwrap.dedent(
    """
    import json
    import torch
    import muse.ops.complex_scan.selective as S
    from muse.ops.decayed_scan.triton import linear_scan

    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 70, 8, generator=g).requires_grad_()
    lm = (-torch.rand(2, 70, 4, generator=g) * 0.3).requires_grad_()
    th = (torch.rand(4, generator=g) * 3).requires_grad_()
    nu = torch.randn(4, generator=g).requires_grad_()
    carry = torch.randn(2, 8, generator=g).requires_grad_()
    up = torch.randn(2, 70, 8, generator=g)
    # the plain scan, then the gated one (lm standing for z)
    calls = [(S.complex_selective_scan, (u, lm, th)),
             (S.complex_gated_selective_scan, (u, lm, th, nu, carry))]
    grads = []
    for scan in (lambda x, d, reverse=False: linear_scan(x, d, reverse=reverse), S._scan):
        S._scan = scan  # the Triton launches CUDA would make, then the chunked form
        row = []
        for fn, leaves in calls:
            for t in leaves:
                t.grad = None
            h = fn(*leaves)
            (h * up).sum().backward()
            row += [h.detach(), *(t.grad for t in leaves)]
        grads.append(row)
    print(json.dumps([float((a - b).norm() / b.norm()) for a, b in zip(*grads)]))
    """
)


@pytest.mark.slow  # an interpreter subprocess
def test_the_triton_path_of_the_selective_scan_matches_the_chunked_form():
    """CUDA's path (the scan one Triton launch each way) under TRITON_INTERPRET=1 against the
    chunked form, both float32: h and ∂u, ∂log|λ|, ∂θ relative in norm (seen ≤ 2.5e-6), then
    the gated scan's h and ∂p, ∂z, ∂θ, ∂bias, ∂carry."""
    errors = run_interpreted(_TRITON_PATH, timeout=300, min_triton=(3, 7))
    assert len(errors) == 10 and max(errors) <= 2e-5, errors


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="u and log_decay must both be"):
        selective_cumsum(torch.zeros(1, 4, 3), torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match=r"need u \(B, N, 2R\)"):
        complex_selective_scan(torch.zeros(1, 4, 6), torch.zeros(1, 4, 2), torch.zeros(3))
    p, z, angle = torch.zeros(1, 4, 6), torch.zeros(1, 4, 3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"need p \(B, N, 2R\), z \(B, N, R\)"):
        complex_gated_selective_scan(p, z[..., :2], angle)
    with pytest.raises(ValueError, match=r"need bias \(R,\)"):
        complex_gated_selective_scan(p, z, angle, bias=torch.zeros(2))
    with pytest.raises(ValueError, match=r"need carry \(B, 2R\)"):
        complex_gated_selective_scan(p, z, angle, carry=torch.zeros(1, 3))
