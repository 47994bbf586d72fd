"""Each chunk's solve (reference.chunk_solve_reference) in one Triton launch forward and one
backward: a program owns one chunk, forms A from its keys, β and decays, inverts I + A by
forward substitution in registers (row by row, or in 16-row blocks joined by products: INVERSE)
and applies the inverse to both right-hand sides. Only the
inputs are kept for backward: KKᵀ, the decay ratios, A and (I + A)⁻¹ (each (T × T) float32 a
chunk, and all four kept by the batched PyTorch form) are formed again there.

Backward, per chunk, with X = (I + A)⁻¹ [βV, βγK] = [U₀, P]: dR = (I + A)⁻ᵀ dX and
G = −(dR Xᵀ) below the diagonal; then, with H = G ⊙ R ⊙ KKᵀ and E = β ⊙ H, dβ = rowsum(dR_V ⊙ V)
+ γ rowsum(dR_K ⊙ K) + rowsum(H), dV = β dR_V, dK = βγ dR_K + (β ⊙ R ⊙ G) K + (β ⊙ R ⊙ G)ᵀ K,
and b's gradient βγ rowsum(dR_K ⊙ K) + rowsum(E) − colsum(E).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muse.ops.delta_states.readout import _chunk_tiles
from muse.ops.delta_states.reference import check_solve_shapes
from muse.ops.delta_states.triton import _precision, supported


@triton.jit
def _diagonal_inverses(k_ptr, beta_ptr, b_ptr, square, T: tl.constexpr, DK: tl.constexpr,
                       DTYPE: tl.constexpr):
    # every (16 × 16) diagonal block of (I + A)⁻¹ at once, as (T/16, 16, 16) tiles: 15
    # substitution steps in all, not 15 a block
    NB: tl.constexpr = T // 16
    chunk = tl.program_id(0).to(tl.int64)
    rb = tl.arange(0, NB)
    r16 = tl.arange(0, 16)
    tb = chunk * T + rb[:, None] * 16 + r16[None, :]  # (NB, 16)
    k3 = tl.load(k_ptr + tb[:, :, None] * DK + tl.arange(0, DK)[None, None, :]).to(DTYPE)
    beta3 = tl.load(beta_ptr + tb)
    b3 = tl.load(b_ptr + tb)
    rows = r16[None, :, None]
    cols = r16[None, None, :]
    kk = tl.dot(k3, tl.permute(k3, (0, 2, 1)), input_precision="ieee", out_dtype=DTYPE)
    a = tl.where(rows > cols, beta3[:, :, None] * tl.exp(b3[:, :, None] - b3[:, None, :]) * kk,
                 0.0)
    inverse = tl.where((rows == cols) & (rb[:, None, None] >= 0), 1.0, 0.0).to(DTYPE)
    for i in range(1, 16):
        a_i = tl.sum(tl.where(rows == i, a, 0.0), 1)
        inverse = tl.where(rows == i, inverse - tl.sum(a_i[:, :, None] * inverse, 1)[:, None, :],
                           inverse)
    at = (rb[:, None, None] * 16 + rows) * T + rb[:, None, None] * 16 + cols
    tl.store(square + at, inverse)


@triton.jit
def _block_inverse(k_ptr, beta_ptr, b_ptr, scratch_ptr, T: tl.constexpr, DK: tl.constexpr,
                   DTYPE: tl.constexpr):
    # (I + A)⁻¹ by 16-row blocks: the diagonal blocks by substitution, then
    # X_IJ = −X_II Σ_{J≤L<I} A_IL X_LJ; blocks go through the chunk's scratch (T × T), read back
    # whole once every block is there
    chunk = tl.program_id(0).to(tl.int64)
    r16 = tl.arange(0, 16)
    rk = tl.arange(0, DK)
    rows = r16[:, None]
    square = scratch_ptr + chunk * T * T
    _diagonal_inverses(k_ptr, beta_ptr, b_ptr, square, T, DK, DTYPE)
    tl.debug_barrier()  # the diagonal blocks are read by other threads than wrote them
    for i_block in tl.static_range(T // 16):
        ri = chunk * T + i_block * 16 + r16
        k_i = tl.load(k_ptr + ri[:, None] * DK + rk[None, :]).to(DTYPE)
        beta_i = tl.load(beta_ptr + ri)
        b_i = tl.load(b_ptr + ri)
        block_rows = square + (i_block * 16 + rows) * T
        diag = tl.load(block_rows + i_block * 16 + r16[None, :])
        for j_block in tl.static_range(i_block):
            acc = tl.zeros((16, 16), DTYPE)
            for l_block in tl.static_range(j_block, i_block):
                rl = chunk * T + l_block * 16 + r16
                k_l = tl.load(k_ptr + rl[:, None] * DK + rk[None, :]).to(DTYPE)
                a_il = beta_i[:, None] * tl.exp(b_i[:, None] - tl.load(b_ptr + rl)[None, :]) \
                    * tl.dot(k_i, tl.trans(k_l), input_precision="ieee", out_dtype=DTYPE)
                x_lj = tl.load(square + (l_block * 16 + rows) * T + j_block * 16 + r16[None, :])
                acc += tl.dot(a_il, x_lj, input_precision="ieee", out_dtype=DTYPE)
            tl.store(block_rows + j_block * 16 + r16[None, :],
                     -tl.dot(diag, acc, input_precision="ieee", out_dtype=DTYPE))
        for j_block in tl.static_range(i_block + 1, T // 16):
            tl.store(block_rows + j_block * 16 + r16[None, :], tl.zeros((16, 16), DTYPE))
        tl.debug_barrier()  # this block row is read by the next ones, from other threads
    rt = tl.arange(0, T)
    return tl.load(square + rt[:, None] * T + rt[None, :])


@triton.jit
def _system(k, beta, b, rt, k_ptr, beta_ptr, b_ptr, scratch_ptr, T: tl.constexpr,
            DK: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
            INVERSE: tl.constexpr):
    # R (the decay ratios below the diagonal, 0 on and above), KKᵀ and (I + A)⁻¹
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION, out_dtype=DTYPE)
    rows = rt[:, None]
    ratio = tl.where(rows > rt[None, :], tl.exp(b[:, None] - b[None, :]), 0.0)
    if INVERSE == 2:
        inverse = _block_inverse(k_ptr, beta_ptr, b_ptr, scratch_ptr, T, DK, DTYPE)
    else:
        a = beta[:, None] * ratio * kk
        # row i of the inverse is e_i − Σ_{j<i} A_ij (row j), rows above i final already
        inverse = (rows == rt[None, :]).to(DTYPE)
        chunk = tl.program_id(0).to(tl.int64)
        for i in range(1, T):
            if INVERSE == 1:  # A's row i from k_i, indexed as the inverse's rows are
                k_i = tl.load(k_ptr + (chunk * T + i) * DK + tl.arange(0, DK)).to(DTYPE)
                b_i = tl.load(b_ptr + chunk * T + i)
                a_i = tl.where(rt < i, tl.load(beta_ptr + chunk * T + i) * tl.exp(b_i - b)
                               * tl.sum(k * k_i[None, :], 1), 0.0)
            else:
                a_i = tl.sum(tl.where(rows == i, a, 0.0), 0)
            inverse = tl.where(rows == i,
                               inverse - tl.sum(a_i[:, None] * inverse, 0)[None, :], inverse)
    return ratio, kk, inverse


@triton.jit
def _chunk_system(k_ptr, v_ptr, beta_ptr, b_ptr, scratch_ptr, T: tl.constexpr, DK: tl.constexpr,
                  DV: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
                  INVERSE: tl.constexpr):
    # this program's chunk: its offsets, inputs (k and v cast up) and _system
    tk, tv, _, tb, rt = _chunk_tiles(T, DK, DV)
    k = tl.load(k_ptr + tk).to(DTYPE)
    beta = tl.load(beta_ptr + tb)
    b = tl.load(b_ptr + tb)
    ratio, kk, inverse = _system(k, beta, b, rt, k_ptr, beta_ptr, b_ptr, scratch_ptr, T, DK,
                                 PRECISION, DTYPE, INVERSE)
    return tk, tv, tb, k, tl.load(v_ptr + tv).to(DTYPE), beta, b, ratio, kk, inverse


@triton.jit
def _solve_forward(k_ptr, v_ptr, beta_ptr, b_ptr, u0_ptr, p_ptr, scratch_ptr, T: tl.constexpr,
                   DK: tl.constexpr, DV: tl.constexpr, PRECISION: tl.constexpr,
                   WIDE: tl.constexpr, INVERSE: tl.constexpr):
    DTYPE: tl.constexpr = tl.float64 if WIDE else tl.float32
    tk, tv, _, k, v, beta, b, _, _, inverse = _chunk_system(
        k_ptr, v_ptr, beta_ptr, b_ptr, scratch_ptr, T, DK, DV, PRECISION, DTYPE, INVERSE)
    tl.store(u0_ptr + tv, tl.dot(inverse, beta[:, None] * v, input_precision=PRECISION,
                                 out_dtype=DTYPE))
    tl.store(p_ptr + tk, tl.dot(inverse, (beta * tl.exp(b))[:, None] * k,
                                input_precision=PRECISION, out_dtype=DTYPE))


@triton.jit
def _solve_backward(k_ptr, v_ptr, beta_ptr, b_ptr, du0_ptr, dp_ptr, dk_ptr, dv_ptr, dbeta_ptr,
                    db_ptr, scratch_ptr, T: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    PRECISION: tl.constexpr, WIDE: tl.constexpr,
                    INVERSE: tl.constexpr):
    DTYPE: tl.constexpr = tl.float64 if WIDE else tl.float32
    tk, tv, tb, k, v, beta, b, ratio, kk, inverse = _chunk_system(
        k_ptr, v_ptr, beta_ptr, b_ptr, scratch_ptr, T, DK, DV, PRECISION, DTYPE, INVERSE)
    gamma = tl.exp(b)
    d_rv = tl.dot(tl.trans(inverse), tl.load(du0_ptr + tv), input_precision=PRECISION,
                  out_dtype=DTYPE)
    d_rk = tl.dot(tl.trans(inverse), tl.load(dp_ptr + tk), input_precision=PRECISION,
                  out_dtype=DTYPE)
    u0 = tl.dot(inverse, beta[:, None] * v, input_precision=PRECISION, out_dtype=DTYPE)
    g = tl.dot(d_rv, tl.trans(u0), input_precision=PRECISION, out_dtype=DTYPE)
    p = tl.dot(inverse, (beta * gamma)[:, None] * k, input_precision=PRECISION, out_dtype=DTYPE)
    g += tl.dot(d_rk, tl.trans(p), input_precision=PRECISION, out_dtype=DTYPE)
    # −G masked by R (0 on and above the diagonal); d(βγ) from the keys' right-hand side
    g_ratio = -g * ratio
    h = g_ratio * kk
    through_k = tl.sum(d_rk * k, 1)
    tl.store(dbeta_ptr + tb, tl.sum(d_rv * v, 1) + gamma * through_k + tl.sum(h, 1))
    e = beta[:, None] * h
    tl.store(db_ptr + tb, beta * gamma * through_k + tl.sum(e, 1) - tl.sum(e, 0))
    tl.store(dv_ptr + tv, beta[:, None] * d_rv)
    d_kk = beta[:, None] * g_ratio
    dk = (beta * gamma)[:, None] * d_rk
    dk += tl.dot(d_kk, k, input_precision=PRECISION, out_dtype=DTYPE)
    dk += tl.dot(tl.trans(d_kk), k, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(dk_ptr + tk, dk)


# how each launch forms (I + A)⁻¹, forward and backward (_system's INVERSE: 0 A's rows
# extracted from its tile, 1 formed from the keys, 2 in 16-row blocks): the faster form each
# way by scripts/solve_kernel_timing.py
INVERSE = (0, 2)


def _scratch(k: torch.Tensor, b: torch.Tensor, inverse: int) -> torch.Tensor:
    seqs, m, t, _ = k.shape
    return b.new_empty(seqs * m, t, t) if inverse == 2 else b.new_empty(1)


def _launch(k: torch.Tensor, b: torch.Tensor):
    if b.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"chunk_solve_triton runs in float32 or float64 (b's dtype), got "
                         f"{b.dtype}")
    seqs, m = k.shape[:2]
    # 4 warps: each substitution step's reductions then cross fewer warps
    return (seqs * m,), b.dtype == torch.float64, 4


# custom ops, as the walk's (triton.py): a compiled step stays one graph
@torch.library.custom_op("muse::delta_solve_forward", mutates_args=())
def _forward(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, b: torch.Tensor,
             precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input contiguous → (u0, p) in b's dtype."""
    _, _, t, dk = k.shape
    dv = v.shape[-1]
    grid, wide, warps = _launch(k, b)
    u0 = v.new_empty(v.shape, dtype=b.dtype)
    p = k.new_empty(k.shape, dtype=b.dtype)
    _solve_forward[grid](k, v, beta, b, u0, p, _scratch(k, b, INVERSE[0]), T=t, DK=dk, DV=dv,
                         PRECISION=precision, WIDE=wide, INVERSE=INVERSE[0], num_warps=warps)
    return u0, p


@_forward.register_fake
def _(k, v, beta, b, precision):
    return v.new_empty(v.shape, dtype=b.dtype), k.new_empty(k.shape, dtype=b.dtype)


@torch.library.custom_op("muse::delta_solve_backward", mutates_args=())
def _backward(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, b: torch.Tensor,
              du0: torch.Tensor, dp: torch.Tensor,
              precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every input contiguous → the gradients of k, v, beta and b, each in its input's dtype."""
    _, _, t, dk = k.shape
    dv = v.shape[-1]
    grid, wide, warps = _launch(k, b)
    dk_, dv_, dbeta, db = (torch.empty_like(x) for x in (k, v, beta, b))
    _solve_backward[grid](k, v, beta, b, du0, dp, dk_, dv_, dbeta, db,
                          _scratch(k, b, INVERSE[1]), T=t, DK=dk, DV=dv, PRECISION=precision,
                          WIDE=wide, INVERSE=INVERSE[1], num_warps=warps)
    return dk_, dv_, dbeta, db


@_backward.register_fake
def _(k, v, beta, b, du0, dp, precision):
    return tuple(x.new_empty(x.shape) for x in (k, v, beta, b))


class _ChunkSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, beta, b, precision):
        k, v, beta, b = (x.contiguous() for x in (k, v, beta, b))
        ctx.save_for_backward(k, v, beta, b)
        ctx.precision = precision
        return _forward(k, v, beta, b, precision)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, du0, dp):
        grads = _backward(*ctx.saved_tensors, du0.contiguous(), dp.contiguous(), ctx.precision)
        return *grads, None


def chunk_solve_triton(k, v, beta, b):
    """reference.chunk_solve_reference's contract on CUDA (or under TRITON_INTERPRET=1): beta
    and b in float32 or float64, the dtype it computes and returns in; k and v in any float
    dtype, cast up as they are read (their gradients in their own); T, D_k and D_v in (16, 32,
    64, 128)."""
    check_solve_shapes(k, v, beta, b)
    t, dk, dv = k.shape[2], k.shape[3], v.shape[3]
    if not supported(t, dk, dv):
        raise ValueError(f"chunk_solve_triton needs T, D_k, D_v in (16, 32, 64, 128), got "
                         f"{t}, {dk}, {dv}")
    return _ChunkSolve.apply(k, v, beta, b, _precision(b.dtype))
