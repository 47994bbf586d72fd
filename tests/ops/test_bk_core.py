"""BK-Core (DESIGN §3.1, issue 3): the scan, the reference, the exact gradient and the Triton
kernels, each against an independent float64 definition.

Inputs are always fresh random draws from a seeded generator, never zeros: unequal b ≠ c > 0
(only k = b·c enters, and the dense oracle is built from b and c separately), complex potentials
a with a dissipative part (Im a = −Γ ≤ 0), and shifts z with Im z > 0, so Im α < 0 everywhere.

Errors are measured as `rel_err`: the largest elementwise |x − ref| / |ref| (|g| is bounded away
from 0 here, so elementwise is the strict choice), or `norm_err`: max |x − ref| / max |ref| for
gradients, whose entries can cancel to nearly 0. Every bound says where it comes from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from muse.ops.associative_scan import associative_scan
from muse.ops.bk_core import bk_core
from muse.ops.bk_core.naive import (
    bk_core_reference,
    causal_reference,
    dense_resolvent_diagonal,
)
from muse.ops.bk_core.scan import causal_adjoint, causal_scan

MODES = ("causal", "bidirectional")
F64, C128 = torch.float64, torch.complex128

# float64 against a dense inverse or the sequential recurrence: the matrices below have
# ‖T − z‖ ≲ 10 and Im α ≤ −0.1, so cond(T − z) ≲ 100 and every method is within ~1e-13 of the
# truth; 1e-10 (the bound) leaves three orders of magnitude and still catches any
# wrong index, sign or missing term, which show up at O(1).
TOL_F64 = 1e-10
# complex64 scan vs the float64 reference on the same (rounded) inputs, N = 4096 and 65,536:
# observed at most 4.9e-7 elementwise (4.7e-7 / 2.7e-7 at N = 4096, 4.9e-7 / 3.4e-7 at
# N = 65,536, causal / bidirectional; up to 6.8e-7 over other seeds); bound 5e-6 ≈ 10× observed.
# The error does not grow with N: the projective scan has O(log N) depth and the recurrence is
# contractive when Im α < 0.
TOL_F32 = 5e-6


def make_inputs(
    bsz, n, ch, seed, *, k_batch=None, spread=1.0, gamma=0.5, im_z=(0.1, 1.0), dtype=F64
):
    """a (B, N, C) complex with Re a ~ spread·N(0, 1), Im a = −Γ ∈ (−gamma, 0]; b, c
    (k_batch, N−1, C) independent in [0.5, 1.5) (so b ≠ c and k = b·c ∈ [0.25, 2.25));
    z (C,) with Re z ~ 0.5·N(0, 1), Im z ∈ [im_z)."""
    gen = torch.Generator().manual_seed(seed)
    kb = bsz if k_batch is None else k_batch

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=F64)

    a = torch.complex(
        spread * torch.randn(bsz, n, ch, generator=gen, dtype=F64), -gamma * rand(bsz, n, ch)
    )
    b = 0.5 + rand(kb, n - 1, ch)
    c = 0.5 + rand(kb, n - 1, ch)
    z = torch.complex(
        0.5 * torch.randn(ch, generator=gen, dtype=F64), im_z[0] + (im_z[1] - im_z[0]) * rand(ch)
    )
    cdtype = C128 if dtype == F64 else torch.complex64
    return a.to(cdtype), b.to(dtype), c.to(dtype), z.to(cdtype)


def rel_err(x, ref):
    return ((x.to(C128) - ref).abs() / ref.abs()).max().item()


def norm_err(x, ref):
    return ((x.to(ref.dtype) - ref).abs().max() / ref.abs().max()).item()


def dense_causal_at(a, b, c, z, positions):
    """Causal g at the given positions from the definition: one dense inverse of each leading
    block T_{0..i} − z (its last diagonal entry). dense_resolvent_diagonal(mode='causal') does
    this for every i, O(N⁴): at N = 257 that is ~4 s per channel, so large N takes a subset."""
    bsz, _, ch = a.shape
    b, c = b.expand(bsz, -1, ch), c.expand(bsz, -1, ch)
    cols = [
        dense_resolvent_diagonal(a[:, : i + 1], b[:, :i], c[:, :i], z, "bidirectional")[:, i]
        for i in positions
    ]
    return torch.stack(cols, dim=1)


# -- 1. against the dense definition -----------------------------------------------------------


@pytest.mark.parametrize("k_batch", ["per-sequence", "broadcast"])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 257])
@pytest.mark.parametrize("mode", MODES)
def test_scan_and_reference_match_dense_inverse(mode, n, k_batch):
    bsz, ch = (2, 3) if n <= 8 else (2, 2)
    a, b, c, z = make_inputs(
        bsz, n, ch, seed=100 + n, k_batch=1 if k_batch == "broadcast" else None
    )
    k = b * c
    g_scan = bk_core(a, k, z, mode, backend="scan")
    g_ref = bk_core_reference(a, k, z, mode)
    assert g_scan.dtype == g_ref.dtype == C128 and g_scan.shape == (bsz, n, ch)
    if mode == "causal" and n > 8:
        # every leading block near the start, in the middle, at a power-of-two boundary of the
        # scan, and the last few (the longest chains)
        pos = [0, 1, 2, 3, 63, 64, 127, 128, 129, 200, 254, 255, 256]
        dense = dense_causal_at(a, b, c, z, pos)
        g_scan, g_ref = g_scan[:, pos], g_ref[:, pos]
    else:
        bb, cc = b.expand(bsz, -1, ch), c.expand(bsz, -1, ch)
        dense = dense_resolvent_diagonal(a, bb, cc, z, mode)
    assert rel_err(g_ref, dense) <= TOL_F64
    assert rel_err(g_scan, dense) <= TOL_F64


def test_dense_oracle_uses_only_the_products_b_c():
    """The dense oracle itself: T with (b, c) and with (√k, √k) have the same diagonal resolvent
    (a diagonal similarity), and swapping b ↔ c (the transpose) changes nothing either. A bug
    that used b alone, or b² in place of b·c, would fail here."""
    a, b, c, z = make_inputs(2, 7, 2, seed=7)
    for mode in MODES:
        ref = dense_resolvent_diagonal(a, b, c, z, mode)
        s = (b * c).sqrt()
        assert rel_err(dense_resolvent_diagonal(a, s, s, z, mode), ref) <= TOL_F64
        assert rel_err(dense_resolvent_diagonal(a, c, b, z, mode), ref) <= TOL_F64
        assert rel_err(dense_resolvent_diagonal(a, b, b, z, mode), ref) > 1e-3  # k really moves g


def test_real_potential_matches_dense_inverse():
    """a real (no dissipation): then Im α = −Im z alone keeps T − z invertible."""
    a, b, c, z = make_inputs(2, 8, 3, seed=8)
    a = a.real.contiguous()
    for mode in MODES:
        dense = dense_resolvent_diagonal(a, b, c, z, mode)
        assert rel_err(bk_core(a, b * c, z, mode, backend="scan"), dense) <= TOL_F64
        assert rel_err(bk_core_reference(a, b * c, z, mode), dense) <= TOL_F64


def test_auto_backend_on_cpu_is_the_scan_and_validate_false_changes_nothing():
    a, b, c, z = make_inputs(2, 33, 3, seed=9)
    k = b * c
    for mode in MODES:
        g = bk_core(a, k, z, mode, backend="scan")
        assert torch.equal(bk_core(a, k, z, mode), g)
        assert torch.equal(bk_core(a, k, z, mode, validate=False), g)


# -- 2. long sequences: N = 4096 -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_scan_matches_reference_at_4096_float64(mode):
    a, b, c, z = make_inputs(2, 4096, 3, seed=4096)
    k = b * c
    # observed ≈ 1e-15
    assert rel_err(bk_core(a, k, z, mode, backend="scan"), bk_core_reference(a, k, z, mode)) <= (
        TOL_F64
    )


@pytest.mark.parametrize("mode", MODES)
def test_scan_matches_reference_at_4096_float32(mode):
    a, b, c, z = make_inputs(2, 4096, 3, seed=4097, dtype=torch.float32)
    k = b * c
    g = bk_core(a, k, z, mode, backend="scan")
    assert g.dtype == torch.complex64
    # the reference runs in float64 on the same float32-rounded inputs, so only the scan's own
    # rounding is measured: observed 4.7e-7 (causal), 2.7e-7 (bidirectional)
    assert rel_err(g, bk_core_reference(a, k, z, mode)) <= TOL_F32


def test_float32_gradient_matches_float64_adjoint_at_4096():
    """The backward scan (a reverse linear recurrence) in complex64 against the float64 adjoint
    of the float64 reference, for a random upstream gradient: observed norm_err 3.0e-7 (α) and
    3.2e-7 (k) for this seed, 1.2e-6 at worst over a few others; bound 1e-5 ≈ 10× that."""
    bsz, n, ch = 2, 4096, 3
    a, b, c, z = make_inputs(bsz, n, ch, seed=4098, dtype=torch.float32)
    k = b * c
    gen = torch.Generator().manual_seed(4099)
    up = torch.complex(
        torch.randn(bsz, n, ch, generator=gen), torch.randn(bsz, n, ch, generator=gen)
    )
    g_ref = causal_reference(a.to(C128) - z.to(C128), k.to(F64))
    ga_ref, gk_ref = causal_adjoint(g_ref, k.to(F64), up.to(C128))
    a, k = a.clone().requires_grad_(), k.clone().requires_grad_()
    g = bk_core(a, k, z, backend="scan")
    torch.autograd.backward(g, up)
    assert norm_err(a.grad, ga_ref) <= 1e-5
    assert norm_err(k.grad, gk_ref) <= 1e-5


# -- 3. the exact gradient: gradcheck ------------------------------------------------------------


@pytest.mark.parametrize("k_batch", ["per-sequence", "broadcast"])
@pytest.mark.parametrize("n", [1, 2, 6])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_complex_potential(mode, n, k_batch):
    a, b, c, z = make_inputs(2, n, 2, seed=300 + n, k_batch=1 if k_batch == "broadcast" else None)
    # k ≥ 0.25 and Im z ≥ 0.1 stay valid under gradcheck's ±1e-6 perturbations
    inputs = (a.requires_grad_(), (b * c).requires_grad_(), z.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, k, z: bk_core(a, k, z, mode, backend="scan"), inputs, eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_real_potential(mode):
    a, b, c, z = make_inputs(2, 5, 2, seed=310)
    inputs = (a.real.contiguous().requires_grad_(), (b * c).requires_grad_(), z.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, k, z: bk_core(a, k, z, mode, backend="scan"), inputs, eps=1e-6, atol=1e-7
    )


def test_adjoint_matches_autograd_through_the_reference_at_257():
    """gradcheck covers small N; here the hand-written adjoint against PyTorch's autograd through
    the sequential float64 recurrence at N = 257, B = 2 with broadcast k (1e-10, as in §1)."""
    a, b, c, z = make_inputs(2, 257, 3, seed=257, k_batch=1)
    gen = torch.Generator().manual_seed(258)
    up = torch.complex(
        torch.randn(2, 257, 3, generator=gen, dtype=F64),
        torch.randn(2, 257, 3, generator=gen, dtype=F64),
    )
    grads = []
    for fn in (lambda a, k, z: bk_core(a, k, z, backend="scan"), bk_core_reference):
        leaves = (a.clone().requires_grad_(), (b * c).requires_grad_(), z.clone().requires_grad_())
        torch.autograd.backward(fn(*leaves), up)
        grads.append([x.grad for x in leaves])
    for mine, ref in zip(*grads, strict=True):
        assert norm_err(mine, ref) <= TOL_F64


# -- 4. causality --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_future_inputs_leave_past_outputs_bit_identical(dtype):
    bsz, n, ch = 2, 50, 3
    a, b, c, z = make_inputs(bsz, n, ch, seed=400, dtype=dtype)
    k = b * c
    g = bk_core(a, k, z, backend="scan")
    gen = torch.Generator().manual_seed(401)
    for i in (0, 1, 17, 31, 48):
        # g_i depends on a_0..a_i and on k_0..k_{i−1} (k_j couples positions j and j+1)
        a2 = a.clone()
        a2[:, i + 1 :] += torch.randn(a2[:, i + 1 :].shape, generator=gen, dtype=a.dtype)
        k2 = k.clone()
        k2[:, i:] *= 1.0 + torch.rand(k2[:, i:].shape, generator=gen, dtype=dtype)
        for a_, k_ in ((a2, k), (a, k2), (a2, k2)):
            g2 = bk_core(a_, k_, z, backend="scan")
            assert torch.equal(g2[:, : i + 1], g[:, : i + 1]), f"position ≤ {i} moved"
            assert not torch.equal(g2[:, i + 1 :], g[:, i + 1 :])  # the perturbation is real
        # a single later position j, for a_j alone and k_j alone
        j = i + 1 + (n - i - 2) // 2
        a3 = a.clone()
        a3[:, j] += 0.5
        k3 = k.clone()
        k3[:, j - 1] += 0.5  # k_{j−1} couples j − 1 ≥ i and j
        for a_, k_ in ((a3, k), (a, k3)):
            assert torch.equal(bk_core(a_, k_, z, backend="scan")[:, : i + 1], g[:, : i + 1])


def test_gradient_of_past_output_to_future_inputs_is_exactly_zero():
    bsz, n, ch = 2, 40, 3
    a, b, c, z = make_inputs(bsz, n, ch, seed=402)
    a, k = a.requires_grad_(), (b * c).requires_grad_()
    g = bk_core(a, k, z, backend="scan")
    i = 23
    (g[:, i].real.sum() + g[:, i].imag.sum()).backward()
    assert torch.equal(a.grad[:, i + 1 :], torch.zeros_like(a.grad[:, i + 1 :]))
    assert torch.equal(k.grad[:, i:], torch.zeros_like(k.grad[:, i:]))
    assert (a.grad[:, : i + 1].abs() > 0).all() and (k.grad[:, :i].abs() > 0).all()


# -- 5. N = 65,536 in float32 --------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_float32_at_65536_is_finite_and_matches_reference(mode):
    """observed 4.9e-7 (causal), 3.4e-7 (bidirectional) elementwise: no growth with N (the old
    project's scan went NaN past N ≈ 1.5k). The float64 reference loop takes ~1 s per pass."""
    a, b, c, z = make_inputs(1, 65536, 2, seed=65536, dtype=torch.float32)
    k = b * c
    g = bk_core(a, k, z, mode, backend="scan")
    assert torch.isfinite(g).all()
    assert rel_err(g, bk_core_reference(a, k, z, mode)) <= TOL_F32


# -- 6. the stability bound ----------------------------------------------------------------------


def hard_case(n, ch, seed):
    """No dissipation (a real), Im z = 1e-3, large k ∈ [50, 150): the leading minors θ_i grow
    like √k^i ≈ 10^i and overflow float64 after ~300 positions; g stays ≤ 1/Im z = 1000."""
    gen = torch.Generator().manual_seed(seed)
    a = 2.0 * torch.randn(1, n, ch, generator=gen)
    k = 50.0 + 100.0 * torch.rand(1, n - 1, ch, generator=gen)
    z = torch.complex(torch.randn(ch, generator=gen), torch.full((ch,), 1e-3))
    return a, k, z


def _raw_matmul(earlier, later):
    e00, e01, e10, e11 = earlier
    l00, l01, l10, l11 = later
    return (
        l00 * e00 + l01 * e10,
        l00 * e01 + l01 * e11,
        l10 * e00 + l11 * e10,
        l10 * e01 + l11 * e11,
    )


def test_raw_leading_minors_overflow_float64_in_the_hard_case():
    """What the scan must not do: the same scan of M_i = [[0, 1], [−k_{i−1}, α_i]] without the
    projective normalisation (the products' entries are the leading minors θ_i) overflows
    even in float64, and g = P01 / P11 becomes inf/inf = NaN."""
    n, ch = 4096, 4
    a, k, z = hard_case(n, ch, seed=6)
    alpha = a.to(C128) - z.to(C128)
    k_prev = torch.cat((torch.zeros(1, 1, ch, dtype=F64), k.to(F64)), dim=1)
    m = (torch.zeros_like(alpha), torch.ones_like(alpha), (-k_prev).to(C128), alpha)
    _, p01, _, p11 = associative_scan(m, _raw_matmul)
    finite = torch.isfinite(p11).all(dim=-1)[0]
    first_bad = int((~finite).nonzero()[0])
    assert 200 < first_bad < 500  # log10(θ_i) ≈ i: float64 ends near 10^308
    assert torch.isnan(p01 / p11).any()
    # ... while the normalised scan, in float32 even, stays finite everywhere
    assert torch.isfinite(causal_scan(alpha.to(torch.complex64), k)).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["random", "hard"])
def test_stability_bound_float32_at_4096(kind, mode):
    """|g_i| ≤ 1/(−Im α_i) ≤ 1/min_i(−Im α_i) when k ≥ 0 and Im α < 0 (DESIGN §3.1; in the
    bidirectional mode ‖(T − z)⁻¹‖ ≤ 1/min(−Im α) since T is similar to a symmetric matrix).
    Rounding slack 1e-4 relative: the per-position bound is nearly tight (observed max
    |g_i|·(−Im α_i) = 0.9975 in the random causal case; 0.12 in the hard case)."""
    if kind == "random":
        a, b, c, z = make_inputs(2, 4096, 3, seed=600, dtype=torch.float32)
        k = b * c
        # observed elementwise 4.7e-7 (causal), 3.3e-7 (bidirectional)
        tol = TOL_F32
    else:
        a, k, z = hard_case(4096, 4, seed=6)
        # The problem itself is ill-conditioned (Im z = 1e-3, no dissipation: relative
        # sensitivity ~ |α|·Im g / Im z ~ 1e4 per unit rounding): observed 2.1e-4 (causal) and
        # 2.1e-4 (bidirectional) elementwise for this seed (7.6e-4 at worst over other seeds);
        # bound 2e-3 ≈ 10×. The absolute error is ≤ 3.1e-3 against |g| ≤ 1/Im z = 1000.
        tol = 2e-3
    g = bk_core(a, k, z, mode, backend="scan")
    assert torch.isfinite(g).all()
    neg_im_alpha = (z.imag - a.to(torch.complex64).imag).to(F64)  # −Im α = Im z + Γ
    bound = 1.0 / neg_im_alpha.min().item()
    slack = 1.0 + 1e-4
    assert g.abs().max().item() <= bound * slack
    if mode == "causal":
        assert (g.abs().to(F64) <= slack / neg_im_alpha).all()
    assert rel_err(g, bk_core_reference(a, k, z, mode)) <= tol


# -- 7. the Triton kernels under TRITON_INTERPRET=1 ----------------------------------------------

_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    import muse.ops.bk_core.triton as bt
    from muse.ops.bk_core import bk_core
    from muse.ops.bk_core.naive import causal_reference
    from muse.ops.bk_core.scan import causal_adjoint

    def nerr(x, ref):
        if not ref.numel():
            return 0.0
        return ((x.to(ref.dtype) - ref).abs().max() / ref.abs().max()).item()

    def rerr(x, ref):
        return ((x.to(ref.dtype) - ref).abs() / ref.abs()).max().item()

    out = {}
    gen = torch.Generator().manual_seed(700)
    C64, C128, F64 = torch.complex64, torch.complex128, torch.float64
    # (B, N, C, k batch, sub-chunks per program): N = 1; N not a multiple of the sub-chunk (4)
    # with C not a multiple of block_c (4) and broadcast k; exact multiples with per-sequence k;
    # 2 sub-chunks per program, so the carry crosses many programs through launch (2); and the
    # production 8 sub-chunks per program. Small tiles keep the interpreter fast.
    shapes = [(1, 1, 1, 1, 8), (2, 19, 5, 1, 8), (3, 16, 4, 3, 8), (1, 45, 3, 1, 2),
              (1, 19, 3, 1, 1)]
    for bsz, n, ch, kb, sub in shapes:
        t0 = time.time()
        re = torch.randn(bsz, n, ch, generator=gen, dtype=F64)
        gamma = 0.5 * torch.rand(bsz, n, ch, generator=gen, dtype=F64)
        z = torch.complex(torch.randn(ch, generator=gen, dtype=F64) * 0.5,
                          0.1 + torch.rand(ch, generator=gen, dtype=F64))
        alpha = (torch.complex(re, -gamma) - z).to(C64)
        b = 0.5 + torch.rand(kb, n - 1, ch, generator=gen, dtype=F64)
        c = 0.5 + torch.rand(kb, n - 1, ch, generator=gen, dtype=F64)
        k = (b * c).float()
        up = torch.complex(torch.randn(bsz, n, ch, generator=gen),
                           torch.randn(bsz, n, ch, generator=gen))
        g_ref = causal_reference(alpha.to(C128), k.to(F64))
        ga_ref, gk_ref = causal_adjoint(g_ref, k.to(F64), up.to(C128))
        g = bt.causal_forward_triton(alpha, k, chunk=4, block_c=4, sub=sub)
        ga, gk = bt.causal_backward_triton(g, k, up, chunk=4, block_c=4, sub=sub)
        key = f"B{bsz}_N{n}_C{ch}_kb{kb}_sub{sub}"
        out[key] = {
            "dtypes": [str(g.dtype), str(ga.dtype), str(gk.dtype)],
            "shapes_ok": g.shape == alpha.shape and ga.shape == alpha.shape
            and gk.shape == k.shape,
            "g": rerr(g, g_ref), "grad_alpha": nerr(ga, ga_ref), "grad_k": nerr(gk, gk_ref),
            "seconds": time.time() - t0,
        }
    # bk_core(backend="triton") end to end, default tiles (chunk ≈ √N/2, block_c 16): forward and
    # autograd against the scan
    bsz, n, ch = 2, 19, 5
    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    a = torch.complex(randn(bsz, n, ch), -0.5 * rand(bsz, n, ch))
    k = (0.5 + rand(1, n - 1, ch)) * (0.5 + rand(1, n - 1, ch))
    z = torch.complex(0.5 * randn(ch), 0.1 + rand(ch))
    up = torch.complex(randn(bsz, n, ch), randn(bsz, n, ch))
    for mode in ("causal", "bidirectional"):
        t0 = time.time()
        res = []
        for backend in ("triton", "scan"):
            leaves = [x.clone().requires_grad_() for x in (a, k, z)]
            g = bk_core(*leaves, mode, backend=backend)
            torch.autograd.backward(g, up)
            res.append([g.detach()] + [x.grad for x in leaves])
        errs = [nerr(x, y) for x, y in zip(res[0], res[1])]
        out["bk_core_" + mode] = dict(zip(["g", "grad_a", "grad_k", "grad_z"], errs),
                                      seconds=time.time() - t0)
    # the Triton path inside torch.compile as one graph (fullgraph): forward and gradients
    # against the same path run eagerly
    t0 = time.time()
    def eager(a, k, z):
        return bk_core(a, k, z, "bidirectional", backend="triton", validate=False)
    res = []
    for f in (torch.compile(eager, backend="aot_eager", fullgraph=True), eager):
        leaves = [x.clone().requires_grad_() for x in (a, k, z)]
        g = f(*leaves)
        torch.autograd.backward(g, up)
        res.append([g.detach()] + [x.grad for x in leaves])
    errs = [nerr(x, y) for x, y in zip(res[0], res[1])]
    out["bk_core_compiled"] = dict(zip(["g", "grad_a", "grad_k", "grad_z"], errs),
                                   seconds=time.time() - t0)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def triton_interpreted():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    # A subprocess: TRITON_INTERPRET must be set before triton is first imported, and another
    # test module in this process may already have imported it.
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the interpreter subprocess: ~7 s on 2 cores
def test_triton_kernels_match_reference_under_interpreter(triton_interpreted):
    """Forward g and adjoint (grad α, grad k) from the kernels (complex64 in, fp32 accumulation)
    against the float64 recurrence and its float64 adjoint. Observed ≤ 3.8e-7 (norm_err for the
    gradients, elementwise for g); bound 1e-5 (≈ 100 × complex64 eps, ~25× observed)."""
    tiles = {k: v for k, v in triton_interpreted.items() if not k.startswith("bk_core")}
    assert len(tiles) == 5
    for key, r in tiles.items():
        assert r["dtypes"] == ["torch.complex64", "torch.complex64", "torch.float32"], key
        assert r["shapes_ok"], key
        for name in ("g", "grad_alpha", "grad_k"):
            assert r[name] <= 1e-5, (key, name, r[name])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_bk_core_triton_backend_matches_scan_under_interpreter(triton_interpreted, mode):
    """The autograd wiring of the Triton path (default tiles, broadcast k), forward and the
    gradients to a, k, z, against the scan backend, both complex64: observed ≤ 3.7e-7, bound
    1e-5."""
    r = triton_interpreted["bk_core_" + mode]
    for name in ("g", "grad_a", "grad_k", "grad_z"):
        assert r[name] <= 1e-5, (name, r[name])


@pytest.mark.slow
def test_bk_core_triton_backend_compiles_as_one_graph_under_interpreter(triton_interpreted):
    """BK-Core's custom ops keep the Triton launches out of dynamo's trace: torch.compile
    with fullgraph=True takes the bidirectional Triton path whole, and its forward and
    gradients are the eager path's (the same kernels: observed 0, bound 1e-6)."""
    r = triton_interpreted["bk_core_compiled"]
    for name in ("g", "grad_a", "grad_k", "grad_z"):
        assert r[name] <= 1e-6, (name, r[name])


# -- 8. input checks -----------------------------------------------------------------------------


def _valid(bsz=2, n=5, ch=3):
    a, b, c, z = make_inputs(bsz, n, ch, seed=800)
    return a, b * c, z


def _bad_inputs(case):
    a, k, z = _valid()
    if case == "a not 3-D":
        return (a[0], k, z, "causal", "auto"), "(5, 3)"
    if case == "k wrong length":
        return (a, torch.ones(2, 5, 3, dtype=F64), z, "causal", "auto"), "(2, 5, 3)"
    if case == "k wrong batch":
        return (a, torch.ones(3, 4, 3, dtype=F64), z, "causal", "auto"), "(3, 4, 3)"
    if case == "k wrong channels":
        return (a, torch.ones(2, 4, 2, dtype=F64), z, "causal", "auto"), "(2, 4, 2)"
    if case == "z wrong shape":
        return (a, k, z[:2], "causal", "auto"), "(2,)"
    if case == "Im z = 0":
        z = z.clone()
        z[1] = complex(z[1].real.item(), 0.0)
        return (a, k, z, "causal", "auto"), "0.0"
    if case == "Im z < 0":
        z = z.clone()
        z[2] = complex(z[2].real.item(), -0.5)
        return (a, k, z, "causal", "auto"), "-0.5"
    if case == "negative k":
        k = k.clone()
        k[1, 2, 0] = -0.25
        return (a, k, z, "causal", "auto"), "-0.25"
    if case == "complex k":
        return (a, k.to(C128), z, "causal", "auto"), "complex"
    if case == "N = 0":
        return (a[:, :0], k[:, :0], z, "causal", "auto"), "N = 0"
    if case == "unknown mode":
        return (a, k, z, "anticausal", "auto"), "'anticausal'"
    if case == "unknown backend":
        return (a, k, z, "causal", "cuda"), "'cuda'"
    raise AssertionError(case)


BAD = [
    "a not 3-D",
    "k wrong length",
    "k wrong batch",
    "k wrong channels",
    "z wrong shape",
    "Im z = 0",
    "Im z < 0",
    "negative k",
    "complex k",
    "N = 0",
    "unknown mode",
    "unknown backend",
]


@pytest.mark.parametrize("bad", BAD)
def test_bad_input_raises_value_error_naming_it(bad):
    (a, k, z, mode, backend), named = _bad_inputs(bad)
    with pytest.raises(ValueError) as err:
        bk_core(a, k, z, mode, backend=backend)
    assert named in str(err.value), str(err.value)


def test_real_z_raises_value_error():
    a, k, z = _valid()
    with pytest.raises(ValueError, match="z"):
        bk_core(a, k, z.real.contiguous())


def test_reference_rejects_unknown_mode():
    a, k, z = _valid()
    with pytest.raises(ValueError, match="'anticausal'"):
        bk_core_reference(a, k, z, "anticausal")


# -- 9. the gradient across positions ------------------------------------------------------------


def test_last_output_depends_on_first_input_with_the_exact_derivative():
    """∂g_{N−1}/∂a_0 (the long-range signal the old project lost) from the backward scan,
    against the dense formula ∂[(T − z)⁻¹]_{nn}/∂T_00 = −G_{n0} G_{0n} (n = N−1: the leading
    block of size N is all of T; observed 3e-15 relative, bound 1e-10 as in §1) and a central
    finite difference (h = 1e-5; observed 6e-8 (a) and 5e-8 (k) relative, truncation h²·g‴/6
    and rounding eps·|g|/h both ~1e-7 of |∂| ≈ 1e-4; bound 1e-6). Same for k_0:
    ∂G_nn/∂k_0 = −G_{n0} G_{1n} / c_0 with b_0 = k_0 / c_0. Weak disorder (Re a ~ 0.3·N(0, 1)),
    small Γ and Im z so that the signal survives 64 positions (|∂| ≈ 1e-4 here; with
    Re a ~ N(0, 1) it is localised away to ~1e-9)."""
    n = 64
    a, b, c, z = make_inputs(1, n, 1, seed=900, spread=0.3, gamma=0.02, im_z=(0.05, 0.06))
    k = b * c

    a_, k_ = a.clone().requires_grad_(), k.clone().requires_grad_()
    bk_core(a_, k_, z, backend="scan")[0, -1, 0].real.backward()
    # holomorphic in a: the real loss Re g has PyTorch gradient conj(∂g/∂a); real k: Re ∂g/∂k
    d_a = a_.grad[0, 0, 0].conj()
    d_k_re = k_.grad[0, 0, 0]

    t = (
        torch.diag(a[0, :, 0])
        + torch.diag(b[0, :, 0].to(C128), 1)
        + torch.diag(c[0, :, 0].to(C128), -1)
    )
    gm = torch.linalg.inv(t - z[0] * torch.eye(n, dtype=C128))
    dense_d_a = -gm[n - 1, 0] * gm[0, n - 1]
    dense_d_k = -gm[n - 1, 0] * gm[1, n - 1] / c[0, 0, 0]

    h = 1e-5
    e_a = torch.zeros_like(a)
    e_a[0, 0, 0] = h
    e_k = torch.zeros_like(k)
    e_k[0, 0, 0] = h

    def g_last(a, k):
        return bk_core(a, k, z, backend="scan")[0, -1, 0]

    fd_a = (g_last(a + e_a, k) - g_last(a - e_a, k)) / (2 * h)
    fd_k = (g_last(a, k + e_k) - g_last(a, k - e_k)) / (2 * h)

    assert abs(d_a) > 1e-5 and abs(dense_d_k) > 1e-5  # a real long-range signal
    assert abs(d_a - dense_d_a) <= 1e-10 * abs(dense_d_a)
    assert abs(d_a - fd_a) <= 1e-6 * abs(dense_d_a)
    assert abs(d_k_re - dense_d_k.real) <= 1e-10 * abs(dense_d_k)
    assert abs(d_k_re - fd_k.real) <= 1e-6 * abs(dense_d_k)
    assert abs(fd_k - dense_d_k) <= 1e-6 * abs(dense_d_k)  # the imaginary part too, by FD


def test_one_position_is_the_inverse_of_alpha_with_its_gradient():
    """A decode step: N = 1, no coupling, g = 1/(a − z) and ∂g/∂a = −g² (float64, exact)."""
    a, _, _, z = make_inputs(3, 1, 4, seed=5)
    a.requires_grad_(True)
    k = torch.zeros(3, 0, 4, dtype=torch.float64)
    g = bk_core(a, k, z, "causal")
    want = 1 / (a.detach() - z)
    torch.testing.assert_close(g, want, rtol=1e-14, atol=0)
    (grad,) = torch.autograd.grad(g.real.sum() + g.imag.sum(), a)
    ref_a = a.detach().clone().requires_grad_(True)
    ref = 1 / (ref_a - z)
    (want_grad,) = torch.autograd.grad(ref.real.sum() + ref.imag.sum(), ref_a)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=0)
