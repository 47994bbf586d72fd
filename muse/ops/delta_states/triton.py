"""The delta rule's chunk walk (reference.py's contract) in one Triton launch forward and one
backward, as fla's chunk kernels walk their states: a program owns one sequence and a block of
the state's value columns, keeps that block of W in registers and steps through the chunks, two
small products a chunk. Nothing of the (D_k × D_k) step maps of the two-level walk
(muse.ops.affine_walk) exists, and every product that does not depend on the previous chunk
(the read-out, the gradients of P and K̃) stays outside, one batched product over all chunks.
K̃ and γ_T are formed from the keys (in their own dtype) and decays as each chunk is read:
neither exists in memory nor is kept.

Backward: with G_c the gradient reaching the state entering chunk c (G_M from the last state),
V'_c's is E_c + K̃_c G_{c+1} (E_c: from the read-out) and G_c = (read-out's) + γ_T G_{c+1}
− P_cᵀ (V'_c's); the value columns are independent in both, so the programs split as forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from muse.ops.delta_states.reference import check_shapes


@triton.jit
def _tiles(s, c, m, vb, T: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
           BV: tl.constexpr):
    # offsets in (S, M, T, Dk), (S, M, T, Dv) and (S, M, Dk, Dv), all contiguous
    rt = tl.arange(0, T)
    rk = tl.arange(0, DK)
    rv = vb * BV + tl.arange(0, BV)
    chunk = s * m + c
    tk = chunk * T * DK + rt[:, None] * DK + rk[None, :]
    tv = chunk * T * DV + rt[:, None] * DV + rv[None, :]
    kv = chunk * DK * DV + rk[:, None] * DV + rv[None, :]
    return tk, tv, kv


@triton.jit
def _state(s, vb, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    rk = tl.arange(0, DK)
    rv = vb * BV + tl.arange(0, BV)
    return s * DK * DV + rk[:, None] * DV + rv[None, :]


@triton.jit
def _tail(k_ptr, b_ptr, tk, chunk, T: tl.constexpr, DTYPE: tl.constexpr):
    # K̃ = k e^{b_T − b_t} (T × Dk) and γ_T = e^{b_T}: reference.tail_keys
    b = tl.load(b_ptr + chunk * T + tl.arange(0, T))
    b_last = tl.load(b_ptr + chunk * T + T - 1)
    return tl.load(k_ptr + tk).to(DTYPE) * tl.exp(b_last - b)[:, None], tl.exp(b_last)


@triton.jit
def _walk_forward(p_ptr, u0_ptr, k_ptr, b_ptr, w_ptr, entering_ptr, fresh_ptr, last_ptr, m,
                  T: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                  PRECISION: tl.constexpr, WIDE: tl.constexpr):
    DTYPE: tl.constexpr = tl.float64 if WIDE else tl.float32
    s = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1)
    h = tl.load(w_ptr + _state(s, vb, DK, DV, BV))
    for c in range(0, m):
        tk, tv, kv = _tiles(s, c, m, vb, T, DK, DV, BV)
        tl.store(entering_ptr + kv, h)
        fresh = tl.load(u0_ptr + tv) - tl.dot(tl.load(p_ptr + tk), h,
                                              input_precision=PRECISION, out_dtype=DTYPE)
        tl.store(fresh_ptr + tv, fresh)
        kt, through = _tail(k_ptr, b_ptr, tk, s * m + c, T, DTYPE)
        h = through * h + tl.dot(tl.trans(kt), fresh, input_precision=PRECISION,
                                 out_dtype=DTYPE)
    tl.store(last_ptr + _state(s, vb, DK, DV, BV), h)


@triton.jit
def _walk_backward(p_ptr, k_ptr, b_ptr, d_entering_ptr, d_fresh_ptr, d_last_ptr, g_fresh_ptr,
                   g_leaving_ptr, g_w_ptr, m, T: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
                   WIDE: tl.constexpr):
    DTYPE: tl.constexpr = tl.float64 if WIDE else tl.float32
    s = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1)
    g = tl.load(d_last_ptr + _state(s, vb, DK, DV, BV))  # reaching the state after chunk c
    for i in range(0, m):
        c = m - 1 - i
        tk, tv, kv = _tiles(s, c, m, vb, T, DK, DV, BV)
        tl.store(g_leaving_ptr + kv, g)
        kt, through = _tail(k_ptr, b_ptr, tk, s * m + c, T, DTYPE)
        g_fresh = tl.load(d_fresh_ptr + tv) + tl.dot(kt, g, input_precision=PRECISION,
                                                     out_dtype=DTYPE)
        tl.store(g_fresh_ptr + tv, g_fresh)
        g = through * g + tl.load(d_entering_ptr + kv) - tl.dot(
            tl.trans(tl.load(p_ptr + tk)), g_fresh, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(g_w_ptr + _state(s, vb, DK, DV, BV), g)


def supported(chunk: int, dk: int, dv: int) -> bool:
    """The kernels' tiles: T, D_k and D_v powers of two from 16 (tl.dot's least) to 128."""
    return all(x in (16, 32, 64, 128) for x in (chunk, dk, dv))


def _precision(dtype: torch.dtype) -> str:
    # float32 products as torch's matmul makes them: TF32 only where it is allowed
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch(u0: torch.Tensor, block_v: int):
    if u0.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"delta_walk_triton runs in float32 or float64, got {u0.dtype}")
    return (u0.shape[0], u0.shape[-1] // block_v), u0.dtype == torch.float64


# custom ops: torch.compile keeps each launch as one opaque node instead of tracing into
# Triton, so a compiled step stays one graph
@torch.library.custom_op("muse::delta_walk_forward", mutates_args=())
def _forward(p: torch.Tensor, u0: torch.Tensor, k: torch.Tensor, b: torch.Tensor,
             w: torch.Tensor, block_v: int,
             precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every input contiguous → (entering, fresh, last)."""
    seqs, m, t, dk = p.shape
    dv = u0.shape[-1]
    grid, wide = _launch(u0, block_v)
    entering = u0.new_empty(seqs, m, dk, dv)
    fresh = torch.empty_like(u0)
    last = torch.empty_like(w)
    _walk_forward[grid](p, u0, k, b, w, entering, fresh, last, m, T=t, DK=dk, DV=dv,
                        BV=block_v, PRECISION=precision, WIDE=wide)
    return entering, fresh, last


@_forward.register_fake
def _(p, u0, k, b, w, block_v, precision):
    seqs, m, _, dk = p.shape
    return u0.new_empty(seqs, m, dk, u0.shape[-1]), u0.new_empty(u0.shape), w.new_empty(w.shape)


@torch.library.custom_op("muse::delta_walk_backward", mutates_args=())
def _backward(p: torch.Tensor, k: torch.Tensor, b: torch.Tensor,
              d_entering: torch.Tensor, d_fresh: torch.Tensor, d_last: torch.Tensor,
              block_v: int, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every input contiguous → (the gradient reaching each V', the one reaching the state
    each chunk leaves, W₀'s)."""
    seqs, m, t, dk = p.shape
    dv = d_fresh.shape[-1]
    grid, wide = _launch(d_fresh, block_v)
    g_fresh = torch.empty_like(d_fresh)
    g_leaving = torch.empty_like(d_entering)
    g_w = torch.empty_like(d_last)
    _walk_backward[grid](p, k, b, d_entering, d_fresh, d_last, g_fresh, g_leaving, g_w,
                         m, T=t, DK=dk, DV=dv, BV=block_v, PRECISION=precision, WIDE=wide)
    return g_fresh, g_leaving, g_w


@_backward.register_fake
def _(p, k, b, d_entering, d_fresh, d_last, block_v, precision):
    return d_fresh.new_empty(d_fresh.shape), d_entering.new_empty(d_entering.shape), \
        d_last.new_empty(d_last.shape)


class _DeltaWalk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, u0, k, b, w, block_v, precision):
        # the kernels index dense tensors
        p, u0, k, b, w = (x.contiguous() for x in (p, u0, k, b, w))
        entering, fresh, last = _forward(p, u0, k, b, w, block_v, precision)
        ctx.save_for_backward(p, k, b, entering, fresh)
        ctx.launch = (block_v, precision)
        return entering, fresh, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_entering, d_fresh, d_last):
        p, k, b, entering, fresh = ctx.saved_tensors
        g_fresh, g_leaving, g_w = _backward(
            p, k, b, d_entering.contiguous(), d_fresh.contiguous(), d_last.contiguous(),
            *ctx.launch)
        # what does not depend on the chunk before: one batched product over all chunks
        g_p = -(g_fresh @ entering.transpose(-1, -2))
        g_kt = fresh @ g_leaving.transpose(-1, -2)
        g_through = (g_leaving * entering).sum((-1, -2))
        # through K̃ = k e^{b_T − b_t} and γ_T = e^{b_T} to k and b
        tail = torch.exp(b[..., -1:] - b)
        g_k = g_kt * tail[..., None]
        g_tail = (g_kt * k).sum(-1) * tail
        g_b = -g_tail
        g_b[..., -1] += g_tail.sum(-1) + g_through * torch.exp(b[..., -1])
        return g_p, g_fresh, g_k.to(k.dtype), g_b, g_w, None, None


def default_block_v(seqs: int, dv: int, sms: int | None) -> int:
    """Value columns a program for `seqs` sequences of D_v columns on a GPU of `sms` streaming
    multiprocessors (None off CUDA): 32, or 16 where blocks of 32 would leave SMs idle."""
    # each program walks every chunk of its sequence in turn: with fewer programs than SMs
    # (few long sequences) narrower blocks make each step of that serial path shorter; with
    # enough programs, wider blocks read P and K̃ fewer times
    if sms is not None and dv >= 32 and seqs * (dv // 32) < sms:
        return 16
    return min(dv, 32)


def delta_walk_triton(p, u0, k, b, w, block_v: int | None = None):
    """reference.delta_walk_reference's contract on CUDA (or under TRITON_INTERPRET=1), in
    float32 or float64 (k in any float dtype, cast up as it is read, its gradient in its own);
    `block_v` value columns a program (default: `default_block_v`)."""
    check_shapes(p, u0, k, b, w)
    t, dk, dv = p.shape[2], p.shape[3], u0.shape[3]
    if not supported(t, dk, dv):
        raise ValueError(f"delta_walk_triton needs T, D_k, D_v in (16, 32, 64, 128), got "
                         f"{t}, {dk}, {dv}")
    if block_v is None:
        sms = (torch.cuda.get_device_properties(u0.device).multi_processor_count
               if u0.is_cuda else None)
        block_v = default_block_v(u0.shape[0], dv, sms)
    if block_v not in (16, 32, 64, 128) or dv % block_v:
        raise ValueError(f"block_v must be 16, 32, 64 or 128 and divide D_v = {dv}, got "
                         f"{block_v}")
    return _DeltaWalk.apply(p, u0, k, b, w, block_v, _precision(u0.dtype))
