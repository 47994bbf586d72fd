"""The delta rule's chunk pass (reference.py's contract) in one Triton launch forward and one
backward, as fla's chunk kernels do for their rules: a program owns one sequence and a block of
the state's value columns, keeps that block of W in registers and walks the chunks, so the
chunk products run on tensor cores and nothing of the (D_k × D_k) step maps of the PyTorch form
(muse.ops.affine_walk) exists.

The value columns are independent in every sum forward and in W's gradient backward; the
gradients of what all columns read (γ⊙Q, K̃, P, the scores, γ_T) are summed over the column
blocks after the launch. Backward keeps only the state entering each chunk (as the PyTorch form
does) and forms V' = U₀ − P W again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muse.ops.delta_states.reference import check_shapes


@triton.jit
def _offsets(s, c, m, vb, T: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
             BV: tl.constexpr):
    # (S, M, T, ·) and (S, M, Dk, Dv) contiguous; int64 from the sequence on
    rt = tl.arange(0, T)
    rk = tl.arange(0, DK)
    rv = vb * BV + tl.arange(0, BV)
    chunk = s * m + c
    tk = chunk * T * DK + rt[:, None] * DK + rk[None, :]
    tv = chunk * T * DV + rt[:, None] * DV + rv[None, :]
    tt = chunk * T * T + rt[:, None] * T + rt[None, :]
    kv = chunk * DK * DV + rk[:, None] * DV + rv[None, :]
    return tk, tv, tt, kv


@triton.jit
def _state_offsets(s, vb, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    rk = tl.arange(0, DK)
    rv = vb * BV + tl.arange(0, BV)
    return s * DK * DV + rk[:, None] * DV + rv[None, :]


@triton.jit
def _forward_kernel(qg_ptr, kt_ptr, qk_ptr, ratio_ptr, u0_ptr, p_ptr, through_ptr, w_ptr,
                    y_ptr, entering_ptr, last_ptr, m,
                    T: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                    PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1)
    state = _state_offsets(s, vb, DK, DV, BV)
    h = tl.load(w_ptr + state)
    for c in range(0, m):
        tk, tv, tt, kv = _offsets(s, c, m, vb, T, DK, DV, BV)
        tl.store(entering_ptr + kv, h)
        p = tl.load(p_ptr + tk)
        fresh = tl.load(u0_ptr + tv) - tl.dot(p, h, input_precision=PRECISION, out_dtype=DTYPE)
        scores = tl.load(ratio_ptr + tt) * tl.load(qk_ptr + tt)
        y = tl.dot(tl.load(qg_ptr + tk), h, input_precision=PRECISION, out_dtype=DTYPE)
        y += tl.dot(scores, fresh, input_precision=PRECISION, out_dtype=DTYPE)
        tl.store(y_ptr + tv, y)
        kt = tl.load(kt_ptr + tk)
        h = tl.load(through_ptr + s * m + c) * h + tl.dot(
            tl.trans(kt), fresh, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(last_ptr + state, h)


@triton.jit
def _backward_kernel(qg_ptr, kt_ptr, qk_ptr, ratio_ptr, u0_ptr, p_ptr, through_ptr,
                     entering_ptr, dy_ptr, dlast_ptr,
                     dqg_ptr, dkt_ptr, dqk_ptr, dratio_ptr, du0_ptr, dp_ptr, dthrough_ptr,
                     dw_ptr, seqs, m,
                     T: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                     PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1)
    state = _state_offsets(s, vb, DK, DV, BV)
    dh = tl.load(dlast_ptr + state)
    # the column block's share of the gradients that every block adds to
    part_tk = vb.to(tl.int64) * seqs * m * T * DK
    part_tt = vb.to(tl.int64) * seqs * m * T * T
    part_c = vb.to(tl.int64) * seqs * m
    for i in range(0, m):
        c = m - 1 - i
        tk, tv, tt, kv = _offsets(s, c, m, vb, T, DK, DV, BV)
        h = tl.load(entering_ptr + kv)
        p = tl.load(p_ptr + tk)
        fresh = tl.load(u0_ptr + tv) - tl.dot(p, h, input_precision=PRECISION, out_dtype=DTYPE)
        dy = tl.load(dy_ptr + tv)
        ratio = tl.load(ratio_ptr + tt)
        qk = tl.load(qk_ptr + tt)
        kt = tl.load(kt_ptr + tk)
        dfresh = tl.dot(tl.trans(ratio * qk), dy, input_precision=PRECISION, out_dtype=DTYPE)
        dfresh += tl.dot(kt, dh, input_precision=PRECISION, out_dtype=DTYPE)
        tl.store(du0_ptr + tv, dfresh)
        ht = tl.trans(h)
        tl.store(dp_ptr + part_tk + tk,
                 -tl.dot(dfresh, ht, input_precision=PRECISION, out_dtype=DTYPE))
        tl.store(dqg_ptr + part_tk + tk,
                 tl.dot(dy, ht, input_precision=PRECISION, out_dtype=DTYPE))
        tl.store(dkt_ptr + part_tk + tk,
                 tl.dot(fresh, tl.trans(dh), input_precision=PRECISION, out_dtype=DTYPE))
        dscores = tl.dot(dy, tl.trans(fresh), input_precision=PRECISION, out_dtype=DTYPE)
        tl.store(dqk_ptr + part_tt + tt, dscores * ratio)
        tl.store(dratio_ptr + part_tt + tt, dscores * qk)
        tl.store(dthrough_ptr + part_c + s * m + c, tl.sum(tl.sum(dh * h, axis=1), axis=0))
        qg = tl.load(qg_ptr + tk)
        dh = tl.load(through_ptr + s * m + c) * dh
        dh += tl.dot(tl.trans(qg), dy, input_precision=PRECISION, out_dtype=DTYPE)
        dh -= tl.dot(tl.trans(p), dfresh, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(dw_ptr + state, dh)


def supported(chunk: int, dk: int, dv: int) -> bool:
    """The kernels' tiles: T, D_k and D_v powers of two from 16 (tl.dot's least) to 128."""
    return all(x in (16, 32, 64, 128) for x in (chunk, dk, dv))


def _precision(dtype: torch.dtype) -> str:
    # float32 products as torch's matmul makes them: TF32 only where it is allowed
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch(u0: torch.Tensor, block_v: int):
    seqs, m, t, dv = u0.shape
    dtype = {torch.float32: tl.float32, torch.float64: tl.float64}.get(u0.dtype)
    if dtype is None:
        raise ValueError(f"delta_states_triton runs in float32 or float64, got {u0.dtype}")
    return (seqs, dv // block_v), dtype


# custom ops: torch.compile keeps each launch as one opaque node instead of tracing into
# Triton, so a compiled step stays one graph
@torch.library.custom_op("muse::delta_states_forward", mutates_args=())
def _forward(qg: torch.Tensor, kt: torch.Tensor, qk: torch.Tensor, ratio: torch.Tensor,
             u0: torch.Tensor, p: torch.Tensor, through: torch.Tensor, w: torch.Tensor,
             block_v: int, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (y, the state entering each chunk (S, M, Dk, Dv), the state after the last); every
    input contiguous."""
    seqs, m, t, dk = qg.shape
    dv = u0.shape[-1]
    grid, dtype = _launch(u0, block_v)
    y = torch.empty_like(u0)
    entering = u0.new_empty(seqs, m, dk, dv)
    last = torch.empty_like(w)
    _forward_kernel[grid](qg, kt, qk, ratio, u0, p, through, w, y, entering, last, m,
                          T=t, DK=dk, DV=dv, BV=block_v, PRECISION=precision, DTYPE=dtype)
    return y, entering, last


@_forward.register_fake
def _(qg, kt, qk, ratio, u0, p, through, w, block_v, precision):
    seqs, m, _, dk = qg.shape
    return u0.new_empty(u0.shape), u0.new_empty(seqs, m, dk, u0.shape[-1]), w.new_empty(w.shape)


@torch.library.custom_op("muse::delta_states_backward", mutates_args=())
def _backward(qg: torch.Tensor, kt: torch.Tensor, qk: torch.Tensor, ratio: torch.Tensor,
              u0: torch.Tensor, p: torch.Tensor, through: torch.Tensor, entering: torch.Tensor,
              dy: torch.Tensor, dlast: torch.Tensor, block_v: int,
              precision: str) -> list[torch.Tensor]:
    """→ the gradients of (qg, kt, qk, ratio, u0, p, through, w); every input contiguous."""
    seqs, m, t, dk = qg.shape
    dv = u0.shape[-1]
    grid, dtype = _launch(u0, block_v)
    blocks = grid[1]
    dqg, dkt, dp = (qg.new_empty(blocks, seqs, m, t, dk) for _ in range(3))
    dqk, dratio = (qk.new_empty(blocks, seqs, m, t, t) for _ in range(2))
    dthrough = through.new_empty(blocks, seqs, m)
    du0 = torch.empty_like(u0)
    dw = u0.new_empty(seqs, dk, dv)
    _backward_kernel[grid](qg, kt, qk, ratio, u0, p, through, entering, dy, dlast,
                           dqg, dkt, dqk, dratio, du0, dp, dthrough, dw, seqs, m,
                           T=t, DK=dk, DV=dv, BV=block_v, PRECISION=precision, DTYPE=dtype,
                           num_stages=1)  # its loads pipelined overflow shared memory
    dqg, dkt, dqk, dratio, dp, dthrough = (
        x.sum(0) if blocks > 1 else x[0] for x in (dqg, dkt, dqk, dratio, dp, dthrough))
    return [dqg, dkt, dqk, dratio, du0, dp, dthrough, dw]


@_backward.register_fake
def _(qg, kt, qk, ratio, u0, p, through, entering, dy, dlast, block_v, precision):
    seqs, _, _, dk = qg.shape
    return [qg.new_empty(qg.shape), kt.new_empty(kt.shape), qk.new_empty(qk.shape),
            ratio.new_empty(ratio.shape), u0.new_empty(u0.shape), p.new_empty(p.shape),
            through.new_empty(through.shape), u0.new_empty(seqs, dk, u0.shape[-1])]


class _DeltaStates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qg, kt, qk, ratio, u0, p, through, w, block_v, precision):
        # the kernels index dense tensors: u0 and p arrive as slices of one solve
        qg, kt, qk, ratio, u0, p, through, w = (
            x.contiguous() for x in (qg, kt, qk, ratio, u0, p, through, w))
        y, entering, last = _forward(qg, kt, qk, ratio, u0, p, through, w, block_v, precision)
        ctx.save_for_backward(qg, kt, qk, ratio, u0, p, through, entering)
        ctx.launch = (block_v, precision)
        return y, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dlast):
        grads = _backward(*ctx.saved_tensors, dy.contiguous(), dlast.contiguous(), *ctx.launch)
        return *grads, None, None


def delta_states_triton(qg, kt, qk, ratio, u0, p, through, w, block_v: int | None = None):
    """reference.delta_states_reference's contract on CUDA (or under TRITON_INTERPRET=1), in
    float32 or float64; `block_v` value columns a program (default min(D_v, 32))."""
    check_shapes(qg, kt, qk, ratio, u0, p, through, w)
    t, dk, dv = qg.shape[2], qg.shape[3], u0.shape[3]
    if not supported(t, dk, dv):
        raise ValueError(f"delta_states_triton needs T, D_k, D_v in (16, 32, 64, 128), got "
                         f"{t}, {dk}, {dv}")
    block_v = block_v or min(dv, 32)
    if block_v not in (16, 32, 64, 128) or dv % block_v:
        raise ValueError(f"block_v must be 16, 32, 64 or 128 and divide D_v = {dv}, got "
                         f"{block_v}")
    return _DeltaStates.apply(qg, kt, qk, ratio, u0, p, through, w, block_v,
                              _precision(u0.dtype))
