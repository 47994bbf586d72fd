"""Each chunk's output (reference.chunk_readout_reference) in one Triton launch forward and one
backward: a program owns one chunk, forms its (T × T) scores in registers and never writes
them, so neither QKᵀ nor the decay ratios R exist in memory or are kept for backward (autograd
through the batched products keeps both, a (T × T) float32 tensor a chunk each).

Backward, per chunk, with dS = dY V'ᵀ and R̃ = R ⊙ QKᵀ: dQ = γ ⊙ (dY Wᵀ) + (dS ⊙ R) K,
dK = (dS ⊙ R)ᵀ Q, dV' = R̃ᵀ dY, dW = (γ ⊙ Q)ᵀ dY, and b's gradient
rowsum(dY ⊙ (γ ⊙ Q) W) + rowsum(dS ⊙ R̃) − colsum(dS ⊙ R̃) (R_tj depends on b_t − b_j).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muse.ops.delta_states.reference import check_readout_shapes
from muse.ops.delta_states.triton import _precision, supported


@triton.jit
def _chunk_tiles(T: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
    # one chunk's offsets in (…, T, Dk), (…, T, Dv), (…, Dk, Dv) and (…, T), all contiguous
    chunk = tl.program_id(0).to(tl.int64)
    rt = tl.arange(0, T)
    rk = tl.arange(0, DK)
    rv = tl.arange(0, DV)
    tk = chunk * T * DK + rt[:, None] * DK + rk[None, :]
    tv = chunk * T * DV + rt[:, None] * DV + rv[None, :]
    kv = chunk * DK * DV + rk[:, None] * DV + rv[None, :]
    return tk, tv, kv, chunk * T + rt, rt


@triton.jit
def _ratio(b, rt):
    # e^{b_t − b_j} on and below the diagonal; above it b_t − b_j ≥ 0 may overflow, never read
    return tl.where(rt[:, None] >= rt[None, :], tl.exp(b[:, None] - b[None, :]), 0.0)


@triton.jit
def _readout_forward(q_ptr, k_ptr, fresh_ptr, entering_ptr, b_ptr, y_ptr, T: tl.constexpr,
                     DK: tl.constexpr, DV: tl.constexpr, PRECISION: tl.constexpr,
                     WIDE: tl.constexpr):
    DTYPE: tl.constexpr = tl.float64 if WIDE else tl.float32
    tk, tv, kv, tb, rt = _chunk_tiles(T, DK, DV)
    q = tl.load(q_ptr + tk).to(DTYPE)
    b = tl.load(b_ptr + tb)
    k = tl.load(k_ptr + tk).to(DTYPE)
    scores = _ratio(b, rt) * tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=DTYPE)
    y = tl.exp(b)[:, None] * tl.dot(q, tl.load(entering_ptr + kv), input_precision=PRECISION,
                                    out_dtype=DTYPE)
    y += tl.dot(scores, tl.load(fresh_ptr + tv), input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(y_ptr + tv, y)


@triton.jit
def _readout_backward(q_ptr, k_ptr, fresh_ptr, entering_ptr, b_ptr, dy_ptr, dq_ptr, dk_ptr,
                      dfresh_ptr, dentering_ptr, db_ptr, T: tl.constexpr, DK: tl.constexpr,
                      DV: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
    DTYPE: tl.constexpr = tl.float64 if WIDE else tl.float32
    tk, tv, kv, tb, rt = _chunk_tiles(T, DK, DV)
    q = tl.load(q_ptr + tk).to(DTYPE)
    k = tl.load(k_ptr + tk).to(DTYPE)
    v = tl.load(fresh_ptr + tv)
    w = tl.load(entering_ptr + kv)
    b = tl.load(b_ptr + tb)
    dy = tl.load(dy_ptr + tv)
    gamma = tl.exp(b)[:, None]
    ratio = _ratio(b, rt)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=DTYPE)
    ds = tl.dot(dy, tl.trans(v), input_precision=PRECISION, out_dtype=DTYPE) * ratio
    dq = gamma * tl.dot(dy, tl.trans(w), input_precision=PRECISION, out_dtype=DTYPE)
    dq += tl.dot(ds, k, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(dq_ptr + tk, dq)
    tl.store(dk_ptr + tk, tl.dot(tl.trans(ds), q, input_precision=PRECISION, out_dtype=DTYPE))
    tl.store(dfresh_ptr + tv, tl.dot(tl.trans(ratio * qk), dy, input_precision=PRECISION,
                                     out_dtype=DTYPE))
    gq = gamma * q
    tl.store(dentering_ptr + kv, tl.dot(tl.trans(gq), dy, input_precision=PRECISION,
                                        out_dtype=DTYPE))
    inter = tl.dot(gq, w, input_precision=PRECISION, out_dtype=DTYPE)
    g_log_ratio = ds * qk
    db = tl.sum(dy * inter, 1) + tl.sum(g_log_ratio, 1) - tl.sum(g_log_ratio, 0)
    tl.store(db_ptr + tb, db)


def _launch(q: torch.Tensor, fresh: torch.Tensor):
    if fresh.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"chunk_readout_triton runs in float32 or float64 (fresh's dtype), "
                         f"got {fresh.dtype}")
    seqs, m, t, dk = q.shape
    # a (T × T) block and five (T × D) tiles live at once in backward: more warps hold them
    warps = 8 if t * max(dk, fresh.shape[-1]) >= 4096 else 4
    return (seqs * m,), fresh.dtype == torch.float64, warps


# custom ops, as the walk's (triton.py): a compiled step stays one graph
@torch.library.custom_op("muse::delta_readout_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, fresh: torch.Tensor, entering: torch.Tensor,
             b: torch.Tensor, precision: str) -> torch.Tensor:
    """Every input contiguous → y (S, M, T, Dv)."""
    _, _, t, dk = q.shape
    dv = fresh.shape[-1]
    grid, wide, warps = _launch(q, fresh)
    y = torch.empty_like(fresh)
    _readout_forward[grid](q, k, fresh, entering, b, y, T=t, DK=dk, DV=dv, PRECISION=precision,
                           WIDE=wide, num_warps=warps)
    return y


@_forward.register_fake
def _(q, k, fresh, entering, b, precision):
    return fresh.new_empty(fresh.shape)


@torch.library.custom_op("muse::delta_readout_backward", mutates_args=())
def _backward(q: torch.Tensor, k: torch.Tensor, fresh: torch.Tensor, entering: torch.Tensor,
              b: torch.Tensor, dy: torch.Tensor,
              precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor]:
    """Every input contiguous → the gradients of q, k, fresh, entering and b."""
    _, _, t, dk = q.shape
    dv = fresh.shape[-1]
    grid, wide, warps = _launch(q, fresh)
    dq, dk_, dfresh, dentering, db = (torch.empty_like(x) for x in (q, k, fresh, entering, b))
    _readout_backward[grid](q, k, fresh, entering, b, dy, dq, dk_, dfresh, dentering, db, T=t,
                            DK=dk, DV=dv, PRECISION=precision, WIDE=wide, num_warps=warps)
    return dq, dk_, dfresh, dentering, db


@_backward.register_fake
def _(q, k, fresh, entering, b, dy, precision):
    return tuple(x.new_empty(x.shape) for x in (q, k, fresh, entering, b))


class _ChunkReadout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, fresh, entering, b, precision):
        q, k, fresh, entering, b = (x.contiguous() for x in (q, k, fresh, entering, b))
        ctx.save_for_backward(q, k, fresh, entering, b)
        ctx.precision = precision
        return _forward(q, k, fresh, entering, b, precision)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        grads = _backward(*ctx.saved_tensors, dy.contiguous(), ctx.precision)
        return *grads, None


def chunk_readout_triton(q, k, fresh, entering, b):
    """reference.chunk_readout_reference's contract on CUDA (or under TRITON_INTERPRET=1): fresh,
    entering and b in float32 or float64, the dtype it computes and returns in; q and k in any
    float dtype, cast up as they are read (their gradients in their own); T, D_k and D_v in
    (16, 32, 64, 128)."""
    check_readout_shapes(q, k, fresh, entering, b)
    t, dk, dv = q.shape[2], q.shape[3], fresh.shape[3]
    if not supported(t, dk, dv):
        raise ValueError(f"chunk_readout_triton needs T, D_k, D_v in (16, 32, 64, 128), got "
                         f"{t}, {dk}, {dv}")
    return _ChunkReadout.apply(q, k, fresh, entering, b, _precision(fresh.dtype))
