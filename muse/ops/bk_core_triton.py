"""BK-Core on the GPU: Triton kernels for the causal forward and its exact adjoint.

Both are one projective scan of 2×2 complex matrices (see bk_core_scan.py):
- forward, positions in order: M_p = [[0, 1], [−k_{p−1}, α_p]], g_p = P01 / P11;
- adjoint, positions reversed: the affine step λ_p = ḡ_p + c_p λ_{p+1} with
  c_p = conj(k_p g_{p+1}²) is the matrix [[c_p, ḡ_p], [0, 1]] acting on (λ, 1), so the same
  normalised scan gives λ_p = P01 / P11 while keeping the running products of c in range.
The scan runs in three launches so that every (chunk × channel-block) tile is its own program:
(1) each tile's total product, (2) an in-order scan of the tile totals per channel,
(3) each tile rescanned with its carry-in, and written. Inputs are read twice (1.6× the bytes
of a single pass), the price of not serialising the tiles. Everything accumulates in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 128  # positions per tile
BLOCK_C = 16  # channels per tile
TOTALS_BLOCK = 64  # chunk totals scanned per step in launch (2)


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _combine(e00r, e00i, e01r, e01i, e10r, e10i, e11r, e11i,
             l00r, l00i, l01r, l01i, l10r, l10i, l11r, l11i):
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
    s = tl.maximum(tl.maximum(tl.maximum(tl.abs(m00r), tl.abs(m00i)),
                              tl.maximum(tl.abs(m01r), tl.abs(m01i))),
                   tl.maximum(tl.maximum(tl.abs(m10r), tl.abs(m10i)),
                              tl.maximum(tl.abs(m11r), tl.abs(m11i))))
    inv = 1.0 / s
    return (m00r * inv, m00i * inv, m01r * inv, m01i * inv,
            m10r * inv, m10i * inv, m11r * inv, m11i * inv)


@triton.jit
def _elements(x_ptr, k_ptr, gg_ptr, pos, col, mask, b, N, C, k_bstride,
              BACKWARD: tl.constexpr):
    """The tile's matrices; identity where masked so padding does not change any product."""
    zero = mask.to(tl.float32) * 0.0  # full tile shape (pos alone is a column)
    one = zero + 1.0
    off = (b * N + pos) * C + col
    if BACKWARD:
        # x = g; element p: [[conj(k_p g_{p+1}²), ḡ_p], [0, 1]]
        has_next = mask & (pos < N - 1)
        kp = tl.load(k_ptr + b * k_bstride + pos * C + col, mask=has_next, other=0.0)
        gr = tl.load(x_ptr + 2 * (off + C), mask=has_next, other=0.0)
        gi = tl.load(x_ptr + 2 * (off + C) + 1, mask=has_next, other=0.0)
        g2r, g2i = _cmul(gr, gi, gr, gi)
        bar = tl.load(gg_ptr + 2 * off, mask=mask, other=0.0)
        bai = tl.load(gg_ptr + 2 * off + 1, mask=mask, other=0.0)
        m00r = tl.where(mask, kp * g2r, one)
        m00i = -kp * g2i
        return m00r, m00i, bar, bai, zero, zero, one, zero
    # x = alpha; element p: [[0, 1], [−k_{p−1}, α_p]]
    has_prev = mask & (pos >= 1)
    kprev = tl.load(k_ptr + b * k_bstride + (pos - 1) * C + col, mask=has_prev, other=0.0)
    ar = tl.load(x_ptr + 2 * off, mask=mask, other=1.0)
    ai = tl.load(x_ptr + 2 * off + 1, mask=mask, other=0.0)
    return tl.where(mask, zero, one), zero, tl.where(mask, one, zero), zero, -kprev, zero, ar, ai


@triton.jit
def _tile(pid_n, pid_c, N, C, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
          BACKWARD: tl.constexpr):
    step = pid_n * CHUNK + tl.arange(0, CHUNK)[:, None]
    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    pos = (N - 1 - step) if BACKWARD else step  # the adjoint runs from the right
    mask = (step < N) & (col < C)
    return step, pos, col, mask


@triton.jit
def _last_row(x, last):
    return tl.sum(tl.where(last, x, 0.0), axis=0)


@triton.jit
def _tile_totals(x_ptr, k_ptr, gg_ptr, tot_ptr, B, N, C, k_bstride,
                 CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BACKWARD: tl.constexpr):
    pid_n, b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    step, pos, col, mask = _tile(pid_n, pid_c, N, C, CHUNK, BLOCK_C, BACKWARD)
    m0, m1, m2, m3, m4, m5, m6, m7 = _elements(
        x_ptr, k_ptr, gg_ptr, pos, col, mask, b, N, C, k_bstride, BACKWARD
    )
    p0, p1, p2, p3, p4, p5, p6, p7 = tl.associative_scan(
        (m0, m1, m2, m3, m4, m5, m6, m7), 0, _combine
    )
    last = (tl.arange(0, CHUNK) == CHUNK - 1)[:, None]
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    base = tot_ptr + ((pid_n * B + b) * C + cols) * 8
    ok = cols < C
    tl.store(base + 0, _last_row(p0, last), mask=ok)
    tl.store(base + 1, _last_row(p1, last), mask=ok)
    tl.store(base + 2, _last_row(p2, last), mask=ok)
    tl.store(base + 3, _last_row(p3, last), mask=ok)
    tl.store(base + 4, _last_row(p4, last), mask=ok)
    tl.store(base + 5, _last_row(p5, last), mask=ok)
    tl.store(base + 6, _last_row(p6, last), mask=ok)
    tl.store(base + 7, _last_row(p7, last), mask=ok)


@triton.jit
def _scan_totals(tot_ptr, B, C, NCH, TB: tl.constexpr, BLOCK_C: tl.constexpr):
    """Inclusive scan of the tile totals along the chunk axis, in place, with a running carry."""
    b, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    zero = tl.zeros([1, BLOCK_C], tl.float32)
    c0, c1, c2, c3, c4, c5, c6, c7 = zero + 1.0, zero, zero, zero, zero, zero, zero + 1.0, zero
    full = tl.zeros([TB, BLOCK_C], tl.float32)
    last = (tl.arange(0, TB) == TB - 1)[:, None]
    for start in range(0, NCH, TB):
        rows = start + tl.arange(0, TB)[:, None]
        mask = (rows < NCH) & (cols[None, :] < C)
        q = tot_ptr + ((rows * B + b) * C + cols[None, :]) * 8
        t0, t1, t2, t3, t4, t5, t6, t7 = tl.associative_scan(
            (tl.load(q + 0, mask=mask, other=1.0) + full, tl.load(q + 1, mask=mask, other=0.0),
             tl.load(q + 2, mask=mask, other=0.0), tl.load(q + 3, mask=mask, other=0.0),
             tl.load(q + 4, mask=mask, other=0.0), tl.load(q + 5, mask=mask, other=0.0),
             tl.load(q + 6, mask=mask, other=1.0), tl.load(q + 7, mask=mask, other=0.0)),
            0, _combine,
        )
        s0, s1, s2, s3, s4, s5, s6, s7 = _combine(
            c0, c1, c2, c3, c4, c5, c6, c7, t0, t1, t2, t3, t4, t5, t6, t7
        )
        tl.store(q + 0, s0, mask=mask)
        tl.store(q + 1, s1, mask=mask)
        tl.store(q + 2, s2, mask=mask)
        tl.store(q + 3, s3, mask=mask)
        tl.store(q + 4, s4, mask=mask)
        tl.store(q + 5, s5, mask=mask)
        tl.store(q + 6, s6, mask=mask)
        tl.store(q + 7, s7, mask=mask)
        c0 = _last_row(s0, last)[None, :]
        c1 = _last_row(s1, last)[None, :]
        c2 = _last_row(s2, last)[None, :]
        c3 = _last_row(s3, last)[None, :]
        c4 = _last_row(s4, last)[None, :]
        c5 = _last_row(s5, last)[None, :]
        c6 = _last_row(s6, last)[None, :]
        c7 = _last_row(s7, last)[None, :]


@triton.jit
def _row(ptr, mask, other: tl.constexpr):
    return tl.load(ptr, mask=mask, other=other)[None, :]


@triton.jit
def _tile_outputs(x_ptr, k_ptr, gg_ptr, tot_ptr, out_ptr, gk_ptr, B, N, C, k_bstride,
                  CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BACKWARD: tl.constexpr):
    pid_n, b, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    step, pos, col, mask = _tile(pid_n, pid_c, N, C, CHUNK, BLOCK_C, BACKWARD)
    m0, m1, m2, m3, m4, m5, m6, m7 = _elements(
        x_ptr, k_ptr, gg_ptr, pos, col, mask, b, N, C, k_bstride, BACKWARD
    )
    p0, p1, p2, p3, p4, p5, p6, p7 = tl.associative_scan(
        (m0, m1, m2, m3, m4, m5, m6, m7), 0, _combine
    )
    # carry-in: the inclusive total of the previous chunk, identity for the first
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    has = (cols < C) & ((cols * 0 + pid_n) > 0)
    cp = tot_ptr + (((pid_n - 1) * B + b) * C + cols) * 8
    _, _, p2, p3, _, _, p6, p7 = _combine(
        _row(cp + 0, has, 1.0), _row(cp + 1, has, 0.0), _row(cp + 2, has, 0.0),
        _row(cp + 3, has, 0.0), _row(cp + 4, has, 0.0), _row(cp + 5, has, 0.0),
        _row(cp + 6, has, 1.0), _row(cp + 7, has, 0.0),
        p0, p1, p2, p3, p4, p5, p6, p7,
    )
    # ratio P01 / P11
    den = p6 * p6 + p7 * p7
    rr = (p2 * p6 + p3 * p7) / den
    ri = (p3 * p6 - p2 * p7) / den
    off = (b * N + pos) * C + col
    if BACKWARD:
        # λ_p is rr + i·ri; ∂L/∂α_p = −conj(g_p²) λ_p; ∂L/∂k_{p−1} = Re(conj(g_{p−1} g_p²) λ_p)
        gr = tl.load(x_ptr + 2 * off, mask=mask, other=0.0)
        gi = tl.load(x_ptr + 2 * off + 1, mask=mask, other=0.0)
        g2r, g2i = _cmul(gr, gi, gr, gi)
        ar, ai = _cmul(g2r, -g2i, rr, ri)
        tl.store(out_ptr + 2 * off, -ar, mask=mask)
        tl.store(out_ptr + 2 * off + 1, -ai, mask=mask)
        has_prev = mask & (pos >= 1)
        pr = tl.load(x_ptr + 2 * (off - C), mask=has_prev, other=0.0)
        pi = tl.load(x_ptr + 2 * (off - C) + 1, mask=has_prev, other=0.0)
        qr, qi = _cmul(pr, pi, g2r, g2i)
        gk = qr * rr + qi * ri  # Re(conj(q) λ)
        tl.store(gk_ptr + (b * (N - 1) + pos - 1) * C + col, gk, mask=has_prev)
    else:
        tl.store(out_ptr + 2 * off, rr, mask=mask)
        tl.store(out_ptr + 2 * off + 1, ri, mask=mask)


def _launch(x, k, grad_g, backward: bool, chunk: int = CHUNK, block_c: int = BLOCK_C):
    bsz, n, ch = x.shape
    x_r = torch.view_as_real(x.contiguous())
    k = k.contiguous()
    gg_r = torch.view_as_real(grad_g.resolve_conj().contiguous()) if backward else x_r
    k_bstride = 0 if k.shape[0] == 1 else k.stride(0)
    n_chunks = triton.cdiv(n, chunk)
    grid = (n_chunks, bsz, triton.cdiv(ch, block_c))
    totals = torch.empty(n_chunks, bsz, ch, 8, device=x.device, dtype=torch.float32)
    _tile_totals[grid](x_r, k, gg_r, totals, bsz, n, ch, k_bstride,
                       CHUNK=chunk, BLOCK_C=block_c, BACKWARD=backward)
    _scan_totals[(bsz, triton.cdiv(ch, block_c))](totals, bsz, ch, n_chunks,
                                                    TB=TOTALS_BLOCK, BLOCK_C=block_c)
    out = torch.empty_like(x_r)
    grad_k = torch.empty(bsz, max(n - 1, 0), ch, device=x.device, dtype=torch.float32)
    _tile_outputs[grid](x_r, k, gg_r, totals, out, grad_k, bsz, n, ch, k_bstride,
                        CHUNK=chunk, BLOCK_C=block_c, BACKWARD=backward)
    return torch.view_as_complex(out), grad_k


def causal_forward_triton(
    alpha: torch.Tensor, k: torch.Tensor, chunk: int = CHUNK, block_c: int = BLOCK_C
) -> torch.Tensor:
    """alpha (B, N, C) complex64, k (B|1, N−1, C) float32 → g (B, N, C) complex64.
    `chunk` and `block_c` (powers of two) set the tile; small tiles keep TRITON_INTERPRET fast."""
    if alpha.dtype != torch.complex64:
        raise ValueError(f"the Triton path computes in complex64, got {alpha.dtype}")
    return _launch(alpha, k.to(torch.float32), None, False, chunk, block_c)[0]


def causal_backward_triton(
    g: torch.Tensor, k: torch.Tensor, grad_g: torch.Tensor, chunk: int = CHUNK,
    block_c: int = BLOCK_C,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_alpha, grad_k = _launch(
        g, k.to(torch.float32), grad_g.to(torch.complex64), True, chunk, block_c
    )
    if k.shape[0] == 1 and grad_k.shape[0] > 1:
        grad_k = grad_k.sum(dim=0, keepdim=True)
    return grad_alpha, grad_k
