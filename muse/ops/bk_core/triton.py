"""BK-Core on the GPU: Triton kernels for the causal forward and its exact adjoint.

The sequence is cut into sub-chunks of L positions, one thread per (sub-chunk, channel), with
channels contiguous in memory so every load of a step is coalesced. Four launches:
(1) each sub-chunk's product of its 2×2 step matrices, walked in order (forward
    M_p = [[0, 1], [−k_{p−1}, α_p]]; adjoint, from the right, the affine step
    λ_p = ḡ_p + c_p λ_{p+1}, c_p = conj(k_p g_{p+1}²), as [[c_p, ḡ_p], [0, 1]]), each product
    divided by its largest entry after every step (projective: the ratio P01/P11 is unchanged);
(2a) the product of each group of GROUP consecutive totals, then (2b) an in-order scan of the
    group products per channel;
(3) each thread runs the recurrence itself from the value carried in at its boundary (every
    earlier group's product, then the earlier totals of its own group) and writes g (forward)
    or ∂α, ∂k (adjoint).
Inputs are read twice (launches 1 and 3), the price of not serialising the sub-chunks.
Everything accumulates in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SUB = 4  # sub-chunks per program
BLOCK_C = 16  # channels per program (contiguous in memory)
GROUP = 16  # sub-chunk totals per group in launches (2a, 2b)


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _combine(
    e00r, e00i, e01r, e01i, e10r, e10i, e11r, e11i, l00r, l00i, l01r, l01i, l10r, l10i, l11r, l11i
):
    # later @ earlier, divided by its largest |Re| or |Im|: projective, so g = P01/P11 holds.
    a, b = _cmul(l00r, l00i, e00r, e00i)
    c, d = _cmul(l01r, l01i, e10r, e10i)
    m00r, m00i = a + c, b + d
    a, b = _cmul(l00r, l00i, e01r, e01i)
    c, d = _cmul(l01r, l01i, e11r, e11i)
    m01r, m01i = a + c, b + d
    a, b = _cmul(l10r, l10i, e00r, e00i)
    c, d = _cmul(l11r, l11i, e10r, e10i)
    m10r, m10i = a + c, b + d
    a, b = _cmul(l10r, l10i, e01r, e01i)
    c, d = _cmul(l11r, l11i, e11r, e11i)
    m11r, m11i = a + c, b + d
    return _normalise(m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i)


@triton.jit
def _normalise(m0, m1, m2, m3, m4, m5, m6, m7):
    s01 = tl.maximum(tl.maximum(tl.abs(m0), tl.abs(m1)), tl.maximum(tl.abs(m2), tl.abs(m3)))
    s23 = tl.maximum(tl.maximum(tl.abs(m4), tl.abs(m5)), tl.maximum(tl.abs(m6), tl.abs(m7)))
    s = tl.maximum(s01, s23)
    inv = 1.0 / s
    return m0 * inv, m1 * inv, m2 * inv, m3 * inv, m4 * inv, m5 * inv, m6 * inv, m7 * inv


@triton.jit
def _positions(pid_n, t, N, C, col, L: tl.constexpr, SUB: tl.constexpr, BACKWARD: tl.constexpr):
    """Step t of every sub-chunk of this program: a [SUB, BLOCK_C] tile, one row per sub-chunk,
    channels contiguous in memory (coalesced loads); the adjoint walks from the right."""
    step = (pid_n * SUB + tl.arange(0, SUB))[:, None] * L + t
    pos = (N - 1 - step) if BACKWARD else step
    return pos, (step < N) & (col < C)


@triton.jit
def _fwd_in(x_ptr, k_ptr, b, N, C, k_bstride, col, pos, mask, zr, zi):
    has_prev = mask & (pos >= 1)
    kq = tl.load(k_ptr + b * k_bstride + (pos - 1) * C + col, mask=has_prev, other=0.0)
    off = (b * N + pos) * C + col
    ar = tl.load(x_ptr + 2 * off, mask=mask, other=1.0)
    ai = tl.load(x_ptr + 2 * off + 1, mask=mask, other=0.0)
    return ar - zr, ai - zi, kq  # α_p = a_p − z


@triton.jit
def _bwd_in(x_ptr, k_ptr, gg_ptr, b, N, C, k_bstride, col, pos, mask):
    """c_p = conj(k_p g_{p+1}²), ḡ_p, g_p and g_{p−1} for step p of the adjoint."""
    off = (b * N + pos) * C + col
    has_next = mask & (pos < N - 1)
    kp = tl.load(k_ptr + b * k_bstride + pos * C + col, mask=has_next, other=0.0)
    hr = tl.load(x_ptr + 2 * (off + C), mask=has_next, other=0.0)
    hi = tl.load(x_ptr + 2 * (off + C) + 1, mask=has_next, other=0.0)
    br = tl.load(gg_ptr + 2 * off, mask=mask, other=0.0)
    bi = tl.load(gg_ptr + 2 * off + 1, mask=mask, other=0.0)
    gr = tl.load(x_ptr + 2 * off, mask=mask, other=0.0)
    gi = tl.load(x_ptr + 2 * off + 1, mask=mask, other=0.0)
    has_prev = mask & (pos >= 1)
    qr = tl.load(x_ptr + 2 * (off - C), mask=has_prev, other=0.0)
    qi = tl.load(x_ptr + 2 * (off - C) + 1, mask=has_prev, other=0.0)
    h2r, h2i = _cmul(hr, hi, hr, hi)
    return kp * h2r, -kp * h2i, br, bi, gr, gi, qr, qi


@triton.jit
def _keep(mask, n0, n1, n2, n3, n4, n5, n6, n7, m0, m1, m2, m3, m4, m5, m6, m7):
    n0, n1, n2, n3, n4, n5, n6, n7 = _normalise(n0, n1, n2, n3, n4, n5, n6, n7)
    return (
        tl.where(mask, n0, m0),
        tl.where(mask, n1, m1),
        tl.where(mask, n2, m2),
        tl.where(mask, n3, m3),
        tl.where(mask, n4, m4),
        tl.where(mask, n5, m5),
        tl.where(mask, n6, m6),
        tl.where(mask, n7, m7),
    )


@triton.jit
def _fwd_mul(m0, m1, m2, m3, m4, m5, m6, m7, ar, ai, kq, mask):
    # [[0, 1], [−k_{p−1}, α_p]] @ M: row 0 becomes row 1, row 1 becomes α·row1 − k·row0
    x4, x5 = _cmul(ar, ai, m4, m5)
    x6, x7 = _cmul(ar, ai, m6, m7)
    return _keep(
        mask,
        m4,
        m5,
        m6,
        m7,
        x4 - kq * m0,
        x5 - kq * m1,
        x6 - kq * m2,
        x7 - kq * m3,
        m0,
        m1,
        m2,
        m3,
        m4,
        m5,
        m6,
        m7,
    )


@triton.jit
def _bwd_mul(m0, m1, m2, m3, m4, m5, m6, m7, cr, ci, br, bi, mask):
    # [[c, ḡ], [0, 1]] @ M: row 1 is unchanged
    n0, n1 = _cmul(cr, ci, m0, m1)
    x2, x3 = _cmul(cr, ci, m2, m3)
    y2, y3 = _cmul(br, bi, m6, m7)
    return _keep(mask, n0, n1, x2 + y2, x3 + y3, m4, m5, m6, m7, m0, m1, m2, m3, m4, m5, m6, m7)


@triton.jit
def _fwd_out(out_ptr, b, N, C, col, pos, mask, vr, vi, ar, ai, kq):
    dr, di = ar - kq * vr, ai - kq * vi
    den = dr * dr + di * di
    vr, vi = dr / den, -di / den  # g_p = 1/(α_p − k_{p−1} g_{p−1})
    off = (b * N + pos) * C + col
    tl.store(out_ptr + 2 * off, vr, mask=mask)
    tl.store(out_ptr + 2 * off + 1, vi, mask=mask)
    return vr, vi


@triton.jit
def _bwd_out(out_ptr, gk_ptr, b, N, C, col, pos, mask, vr, vi, cr, ci, br, bi, gr, gi, qr, qi):
    tr, ti = _cmul(cr, ci, vr, vi)
    vr, vi = br + tr, bi + ti  # λ_p = ḡ_p + c_p λ_{p+1}
    g2r, g2i = _cmul(gr, gi, gr, gi)
    ar, ai = _cmul(g2r, -g2i, vr, vi)  # ∂L/∂α_p = −conj(g_p²) λ_p
    off = (b * N + pos) * C + col
    tl.store(out_ptr + 2 * off, -ar, mask=mask)
    tl.store(out_ptr + 2 * off + 1, -ai, mask=mask)
    q2r, q2i = _cmul(qr, qi, g2r, g2i)  # ∂L/∂k_{p−1} = Re(conj(g_{p−1} g_p²) λ_p)
    tl.store(
        gk_ptr + (b * (N - 1) + pos - 1) * C + col, q2r * vr + q2i * vi, mask=mask & (pos >= 1)
    )
    return vr, vi


# Launches (1) and (3) walk 4 steps at a time: the 4 steps' loads are issued before any of
# their arithmetic or stores, so each thread keeps 4 loads in flight instead of waiting out a
# full memory latency per step (the compiler cannot hoist loads above possibly aliasing stores).


@triton.jit
def _chunk_totals(
    x_ptr,
    k_ptr,
    gg_ptr,
    z_ptr,
    tot_ptr,
    B,
    N,
    C,
    k_bstride,
    L: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """Launch (1): each sub-chunk's product of its L step matrices, one thread per
    (sub-chunk, channel) walking its positions in order."""
    pid_n, b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    zr = tl.load(z_ptr + 2 * col, mask=col < C, other=0.0)
    zi = tl.load(z_ptr + 2 * col + 1, mask=col < C, other=0.0)
    zero = tl.zeros([SUB, BLOCK_C], tl.float32)
    m0, m1, m2, m3, m4, m5, m6, m7 = zero + 1.0, zero, zero, zero, zero, zero, zero + 1.0, zero
    for t in range(0, L, 4):
        pa, ka = _positions(pid_n, t, N, C, col, L, SUB, BACKWARD)
        pb, kb = _positions(pid_n, t + 1, N, C, col, L, SUB, BACKWARD)
        pc, kc = _positions(pid_n, t + 2, N, C, col, L, SUB, BACKWARD)
        pd, kd = _positions(pid_n, t + 3, N, C, col, L, SUB, BACKWARD)
        if BACKWARD:
            a0, a1, a2, a3, _, _, _, _ = _bwd_in(
                x_ptr, k_ptr, gg_ptr, b, N, C, k_bstride, col, pa, ka
            )
            b0, b1, b2, b3, _, _, _, _ = _bwd_in(
                x_ptr, k_ptr, gg_ptr, b, N, C, k_bstride, col, pb, kb
            )
            c0, c1, c2, c3, _, _, _, _ = _bwd_in(
                x_ptr, k_ptr, gg_ptr, b, N, C, k_bstride, col, pc, kc
            )
            d0, d1, d2, d3, _, _, _, _ = _bwd_in(
                x_ptr, k_ptr, gg_ptr, b, N, C, k_bstride, col, pd, kd
            )
            m0, m1, m2, m3, m4, m5, m6, m7 = _bwd_mul(
                m0, m1, m2, m3, m4, m5, m6, m7, a0, a1, a2, a3, ka
            )
            m0, m1, m2, m3, m4, m5, m6, m7 = _bwd_mul(
                m0, m1, m2, m3, m4, m5, m6, m7, b0, b1, b2, b3, kb
            )
            m0, m1, m2, m3, m4, m5, m6, m7 = _bwd_mul(
                m0, m1, m2, m3, m4, m5, m6, m7, c0, c1, c2, c3, kc
            )
            m0, m1, m2, m3, m4, m5, m6, m7 = _bwd_mul(
                m0, m1, m2, m3, m4, m5, m6, m7, d0, d1, d2, d3, kd
            )
        else:
            a0, a1, a2 = _fwd_in(x_ptr, k_ptr, b, N, C, k_bstride, col, pa, ka, zr, zi)
            b0, b1, b2 = _fwd_in(x_ptr, k_ptr, b, N, C, k_bstride, col, pb, kb, zr, zi)
            c0, c1, c2 = _fwd_in(x_ptr, k_ptr, b, N, C, k_bstride, col, pc, kc, zr, zi)
            d0, d1, d2 = _fwd_in(x_ptr, k_ptr, b, N, C, k_bstride, col, pd, kd, zr, zi)
            m0, m1, m2, m3, m4, m5, m6, m7 = _fwd_mul(
                m0, m1, m2, m3, m4, m5, m6, m7, a0, a1, a2, ka
            )
            m0, m1, m2, m3, m4, m5, m6, m7 = _fwd_mul(
                m0, m1, m2, m3, m4, m5, m6, m7, b0, b1, b2, kb
            )
            m0, m1, m2, m3, m4, m5, m6, m7 = _fwd_mul(
                m0, m1, m2, m3, m4, m5, m6, m7, c0, c1, c2, kc
            )
            m0, m1, m2, m3, m4, m5, m6, m7 = _fwd_mul(
                m0, m1, m2, m3, m4, m5, m6, m7, d0, d1, d2, kd
            )
    chunk = (pid_n * SUB + tl.arange(0, SUB))[:, None]
    ok = (chunk * L < N) & (col < C)
    base = tot_ptr + ((chunk * B + b) * C + col) * 8
    tl.store(base + 0, m0, mask=ok)
    tl.store(base + 1, m1, mask=ok)
    tl.store(base + 2, m2, mask=ok)
    tl.store(base + 3, m3, mask=ok)
    tl.store(base + 4, m4, mask=ok)
    tl.store(base + 5, m5, mask=ok)
    tl.store(base + 6, m6, mask=ok)
    tl.store(base + 7, m7, mask=ok)


@triton.jit
def _total(tot_ptr, i, B, b, C, cols, NCH):
    """Total i (identity where i is outside [0, NCH)); i and cols broadcast together."""
    i = cols * 0 + i
    mask = (cols < C) & (i >= 0) & (i < NCH)
    q = tot_ptr + ((i * B + b) * C + cols) * 8
    return (
        tl.load(q + 0, mask=mask, other=1.0),
        tl.load(q + 1, mask=mask, other=0.0),
        tl.load(q + 2, mask=mask, other=0.0),
        tl.load(q + 3, mask=mask, other=0.0),
        tl.load(q + 4, mask=mask, other=0.0),
        tl.load(q + 5, mask=mask, other=0.0),
        tl.load(q + 6, mask=mask, other=1.0),
        tl.load(q + 7, mask=mask, other=0.0),
    )


@triton.jit
def _store_total(tot_ptr, i, B, b, C, cols, NCH, c0, c1, c2, c3, c4, c5, c6, c7):
    i = cols * 0 + i
    mask = (cols < C) & (i < NCH)
    q = tot_ptr + ((i * B + b) * C + cols) * 8
    tl.store(q + 0, c0, mask=mask)
    tl.store(q + 1, c1, mask=mask)
    tl.store(q + 2, c2, mask=mask)
    tl.store(q + 3, c3, mask=mask)
    tl.store(q + 4, c4, mask=mask)
    tl.store(q + 5, c5, mask=mask)
    tl.store(q + 6, c6, mask=mask)
    tl.store(q + 7, c7, mask=mask)


@triton.jit
def _scan_totals(tot_ptr, B, C, NCH, BLOCK_C: tl.constexpr):
    """Launch (2): inclusive product of the sub-chunk totals in order, in place, one thread per
    channel, two totals loaded ahead."""
    b, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    zero = tl.zeros([BLOCK_C], tl.float32)
    c0, c1, c2, c3, c4, c5, c6, c7 = zero + 1.0, zero, zero, zero, zero, zero, zero + 1.0, zero
    for i in range(0, NCH, 2):
        a0, a1, a2, a3, a4, a5, a6, a7 = _total(tot_ptr, i, B, b, C, cols, NCH)
        b0, b1, b2, b3, b4, b5, b6, b7 = _total(tot_ptr, i + 1, B, b, C, cols, NCH)
        c0, c1, c2, c3, c4, c5, c6, c7 = _combine(
            c0, c1, c2, c3, c4, c5, c6, c7, a0, a1, a2, a3, a4, a5, a6, a7
        )
        _store_total(tot_ptr, i, B, b, C, cols, NCH, c0, c1, c2, c3, c4, c5, c6, c7)
        c0, c1, c2, c3, c4, c5, c6, c7 = _combine(
            c0, c1, c2, c3, c4, c5, c6, c7, b0, b1, b2, b3, b4, b5, b6, b7
        )
        _store_total(tot_ptr, i + 1, B, b, C, cols, NCH, c0, c1, c2, c3, c4, c5, c6, c7)


@triton.jit
def _group_totals(
    tot_ptr, grp_ptr, B, C, NCH, NGRP, G: tl.constexpr, SUB: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Launch (2a): the product of each group of G consecutive sub-chunk totals, so that the
    in-order carry of launch (2b) walks N/(L·G) groups instead of N/L totals."""
    pid, b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    grp = (pid * SUB + tl.arange(0, SUB))[:, None]
    zero = tl.zeros([SUB, BLOCK_C], tl.float32)
    c0, c1, c2, c3, c4, c5, c6, c7 = zero + 1.0, zero, zero, zero, zero, zero, zero + 1.0, zero
    for j in range(G):
        t0, t1, t2, t3, t4, t5, t6, t7 = _total(tot_ptr, grp * G + j, B, b, C, col, NCH)
        c0, c1, c2, c3, c4, c5, c6, c7 = _combine(
            c0, c1, c2, c3, c4, c5, c6, c7, t0, t1, t2, t3, t4, t5, t6, t7
        )
    _store_total(grp_ptr, grp, B, b, C, col, NGRP, c0, c1, c2, c3, c4, c5, c6, c7)


@triton.jit
def _chunk_outputs(
    x_ptr,
    k_ptr,
    gg_ptr,
    z_ptr,
    tot_ptr,
    grp_ptr,
    out_ptr,
    gk_ptr,
    B,
    N,
    C,
    k_bstride,
    NCH,
    L: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BACKWARD: tl.constexpr,
    G: tl.constexpr,
):
    """Launch (3): from the value carried in at its boundary (the ratio P01/P11 of the earlier
    sub-chunks' product; 0 for the first), each thread runs the recurrence itself over its L
    positions: g_p = 1/(α_p − k_{p−1} g_{p−1}) forward, λ_p = ḡ_p + c_p λ_{p+1} backward."""
    pid_n, b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    zr = tl.load(z_ptr + 2 * col, mask=col < C, other=0.0)
    zi = tl.load(z_ptr + 2 * col + 1, mask=col < C, other=0.0)
    chunk = (pid_n * SUB + tl.arange(0, SUB))[:, None]
    # carry-in: the product of every earlier group, then of the earlier totals of this group
    grp = chunk // G
    c0, c1, c2, c3, c4, c5, c6, c7 = _total(grp_ptr, grp - 1, B, b, C, col, grp)
    # totals before this sub-chunk that exist: a program's last sub-chunks may lie past N
    before = tl.minimum(chunk, NCH)
    for j in range(G):
        t0, t1, t2, t3, t4, t5, t6, t7 = _total(tot_ptr, grp * G + j, B, b, C, col, before)
        c0, c1, c2, c3, c4, c5, c6, c7 = _combine(
            c0, c1, c2, c3, c4, c5, c6, c7, t0, t1, t2, t3, t4, t5, t6, t7
        )
    den = c6 * c6 + c7 * c7
    vr = (c2 * c6 + c3 * c7) / den
    vi = (c3 * c6 - c2 * c7) / den
    for t in range(0, L, 4):
        pa, ka = _positions(pid_n, t, N, C, col, L, SUB, BACKWARD)
        pb, kb = _positions(pid_n, t + 1, N, C, col, L, SUB, BACKWARD)
        pc, kc = _positions(pid_n, t + 2, N, C, col, L, SUB, BACKWARD)
        pd, kd = _positions(pid_n, t + 3, N, C, col, L, SUB, BACKWARD)
        if BACKWARD:
            a0, a1, a2, a3, a4, a5, a6, a7 = _bwd_in(
                x_ptr, k_ptr, gg_ptr, b, N, C, k_bstride, col, pa, ka
            )
            b0, b1, b2, b3, b4, b5, b6, b7 = _bwd_in(
                x_ptr, k_ptr, gg_ptr, b, N, C, k_bstride, col, pb, kb
            )
            c0, c1, c2, c3, c4, c5, c6, c7 = _bwd_in(
                x_ptr, k_ptr, gg_ptr, b, N, C, k_bstride, col, pc, kc
            )
            d0, d1, d2, d3, d4, d5, d6, d7 = _bwd_in(
                x_ptr, k_ptr, gg_ptr, b, N, C, k_bstride, col, pd, kd
            )
            vr, vi = _bwd_out(
                out_ptr, gk_ptr, b, N, C, col, pa, ka, vr, vi, a0, a1, a2, a3, a4, a5, a6, a7
            )
            vr, vi = _bwd_out(
                out_ptr, gk_ptr, b, N, C, col, pb, kb, vr, vi, b0, b1, b2, b3, b4, b5, b6, b7
            )
            vr, vi = _bwd_out(
                out_ptr, gk_ptr, b, N, C, col, pc, kc, vr, vi, c0, c1, c2, c3, c4, c5, c6, c7
            )
            vr, vi = _bwd_out(
                out_ptr, gk_ptr, b, N, C, col, pd, kd, vr, vi, d0, d1, d2, d3, d4, d5, d6, d7
            )
        else:
            a0, a1, a2 = _fwd_in(x_ptr, k_ptr, b, N, C, k_bstride, col, pa, ka, zr, zi)
            b0, b1, b2 = _fwd_in(x_ptr, k_ptr, b, N, C, k_bstride, col, pb, kb, zr, zi)
            c0, c1, c2 = _fwd_in(x_ptr, k_ptr, b, N, C, k_bstride, col, pc, kc, zr, zi)
            d0, d1, d2 = _fwd_in(x_ptr, k_ptr, b, N, C, k_bstride, col, pd, kd, zr, zi)
            vr, vi = _fwd_out(out_ptr, b, N, C, col, pa, ka, vr, vi, a0, a1, a2)
            vr, vi = _fwd_out(out_ptr, b, N, C, col, pb, kb, vr, vi, b0, b1, b2)
            vr, vi = _fwd_out(out_ptr, b, N, C, col, pc, kc, vr, vi, c0, c1, c2)
            vr, vi = _fwd_out(out_ptr, b, N, C, col, pd, kd, vr, vi, d0, d1, d2)


def default_chunk(n: int) -> int:
    """Positions per thread: about √N/4 (at least 8, at most 256) balances the in-order walks of
    launches (1, 3) against the parallelism across sub-chunks (tuned at N = 16k to 1M:
    reports/bk_core_tuning.md)."""
    return min(256, max(8, triton.next_power_of_2(math.isqrt(max(n, 1))) // 4))


def _launch(
    x,
    k,
    grad_g,
    backward: bool,
    chunk: int | None = None,
    block_c: int = BLOCK_C,
    sub: int = SUB,
    z: torch.Tensor | None = None,
):
    bsz, n, ch = x.shape
    if z is None:
        z = torch.zeros(ch, dtype=torch.complex64, device=x.device)
    z_r = torch.view_as_real(z.to(torch.complex64).contiguous())
    chunk = chunk or default_chunk(n)
    if chunk < 4 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two ≥ 4, got {chunk}")
    x_r = torch.view_as_real(x.contiguous())
    k = k.contiguous()
    gg_r = torch.view_as_real(grad_g.resolve_conj().contiguous()) if backward else x_r
    k_bstride = 0 if k.shape[0] == 1 else k.stride(0)
    n_chunks = triton.cdiv(n, chunk)
    grid = (triton.cdiv(n_chunks, sub), bsz, triton.cdiv(ch, block_c))
    totals = torch.empty(n_chunks, bsz, ch, 8, device=x.device, dtype=torch.float32)
    _chunk_totals[grid](
        x_r,
        k,
        gg_r,
        z_r,
        totals,
        bsz,
        n,
        ch,
        k_bstride,
        L=chunk,
        SUB=sub,
        BLOCK_C=block_c,
        BACKWARD=backward,
    )
    n_groups = triton.cdiv(n_chunks, GROUP)
    groups = torch.empty(n_groups, bsz, ch, 8, device=x.device, dtype=torch.float32)
    ggrid = (triton.cdiv(n_groups, sub), bsz, triton.cdiv(ch, block_c))
    _group_totals[ggrid](
        totals, groups, bsz, ch, n_chunks, n_groups, G=GROUP, SUB=sub, BLOCK_C=block_c
    )
    _scan_totals[(bsz, triton.cdiv(ch, block_c))](groups, bsz, ch, n_groups, BLOCK_C=block_c)
    out = torch.empty_like(x_r)
    grad_k = torch.empty(bsz, max(n - 1, 0), ch, device=x.device, dtype=torch.float32)
    _chunk_outputs[grid](
        x_r,
        k,
        gg_r,
        z_r,
        totals,
        groups,
        out,
        grad_k,
        bsz,
        n,
        ch,
        k_bstride,
        n_chunks,
        L=chunk,
        SUB=sub,
        BLOCK_C=block_c,
        BACKWARD=backward,
        G=GROUP,
    )
    return torch.view_as_complex(out), grad_k


def causal_forward_triton(
    a: torch.Tensor,
    k: torch.Tensor,
    chunk: int | None = None,
    block_c: int = BLOCK_C,
    sub: int = SUB,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """g (B, N, C) complex64 for α = a − z (α = a when z is None): a (B, N, C) complex64,
    k (B|1, N−1, C) float32, z (C,) complex. Subtracting z as a is loaded saves a pass.
    `chunk` (positions per thread, default ≈ √N/4) and `block_c` (powers of two) set the tile;
    small tiles keep TRITON_INTERPRET fast."""
    if a.dtype != torch.complex64:
        raise ValueError(f"the Triton path computes in complex64, got {a.dtype}")
    return _launch(a, k.to(torch.float32), None, False, chunk, block_c, sub, z)[0]


def causal_backward_triton(
    g: torch.Tensor,
    k: torch.Tensor,
    grad_g: torch.Tensor,
    chunk: int | None = None,
    block_c: int = BLOCK_C,
    sub: int = SUB,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_alpha, grad_k = _launch(
        g, k.to(torch.float32), grad_g.to(torch.complex64), True, chunk, block_c, sub
    )
    if k.shape[0] == 1 and grad_k.shape[0] > 1:
        grad_k = grad_k.sum(dim=0, keepdim=True)
    return grad_alpha, grad_k
