"""The gated delta rule (Schlag et al. 2021; Yang et al. 2024), per head:

    W_t = α_t (I − β_t k_t k_tᵀ) W_{t−1} + β_t k_t v_tᵀ,        y_t = W_tᵀ q_t,

with α_t = e^{log_decay_t} ∈ (0, 1], β_t ∈ (0, 1] and unit keys: before writing v_t under k_t
the memory erases what it held there, so a key rewritten does not pile values up.

Chunked form. With u_t = β_t (v_t − α_t W_{t−1}ᵀ k_t) the update is W_t = α_t W_{t−1} + k_t u_tᵀ,
plain gated linear attention with values u. Inside a chunk of T tokens entered with W_0 and
γ_t = Π_{s≤t} α_s, the u solve the unit lower-triangular system

    (I + A) U = diag(β) (V − diag(γ) K W_0),    A_tj = β_t (γ_t/γ_j) k_t·k_j  (j < t),

so U = U₀ − P W_0 with U₀ = (I + A)⁻¹ diag(β) V and P = (I + A)⁻¹ diag(βγ) K, both solved for
all chunks at once. W_0 ↦ W_T is then affine, and only that runs chunk after chunk.
Every decay ratio is e^{b_t − b_j} with b the in-chunk cumulative log-decay, t ≥ j: nothing
overflows.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from muse.ops.affine_walk import affine_walk, sequential_walk
from muse.ops.decayed_scan.chunk import above_diagonal, pad_time
from muse.ops.unit_lower_solve import unit_lower_solve


def delta_rule_naive(q, k, v, log_decay, beta, state=None):
    """q, k (B, H, N, Dk), v (B, H, N, Dv), log_decay, beta (B, H, N) → y (B, H, N, Dv), W."""
    bsz, heads, n, dk = q.shape
    w = q.new_zeros(bsz, heads, dk, v.shape[-1]) if state is None else state
    out = []
    for t in range(n):
        kt, bt = k[..., t, :], beta[..., t, None]
        w = torch.exp(log_decay[..., t])[..., None, None] * w
        erased = torch.einsum("bhk,bhkv->bhv", kt, w)  # what the memory holds under k_t
        w = w + kt[..., :, None] * (bt * (v[..., t, :] - erased))[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[..., t, :], w))
    return torch.stack(out, dim=2), w


STATES = ("auto", "triton", "torch")


def delta_rule_chunked(q, k, v, log_decay, beta, state=None, chunk: int = 64,
                       recompute: bool = False, states: str = "auto"):
    """Same contract as `delta_rule_naive`; O(N·T) work in batched chunk products plus a
    triangular solve per chunk, and N/T sequential (D_k × D_v) state steps. Padding at the end
    has zero keys and β, log-decay 0: it leaves the final state as it is. With `recompute`,
    backward keeps only the inputs and forms the chunk products, the solve and the states
    again (less memory for one more forward of this form). `states` runs each chunk's solve,
    the chunk-to-chunk walk and each chunk's read-out as Triton launches ("triton",
    muse.ops.delta_states) or as batched PyTorch products and the two-level walk ("torch");
    "auto" takes Triton on CUDA where its tiles fit and float32 matmuls may use TF32
    (torch.backends.cuda.matmul.allow_tf32)."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    if states not in STATES:
        raise ValueError(f"states must be one of {', '.join(STATES)}, got {states!r}")
    # the triangular solve has no half-precision kernels, and its error grows with T: the whole
    # form runs in float32 at least, autocast or not, and returns in that dtype
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        if q.shape[2] == 1:  # decoding: one recurrent step, not one token padded to a chunk
            return delta_rule_naive(*(t.to(acc) for t in (q, k, v, log_decay, beta)),
                                    None if state is None else state.to(acc))
        if recompute and torch.is_grad_enabled():  # keeps q and k in their own dtype too
            return checkpoint(_widened_chunked, q, k, v, log_decay, beta, state, chunk, states,
                              use_reentrant=False, preserve_rng_state=False)
        return _widened_chunked(q, k, v, log_decay, beta, state, chunk, states)


def _widened_chunked(q, k, v, log_decay, beta, state, chunk, states):
    # q and k laid out (B, H, N, D) once: a head slice of the (B, N, H, D) projections kept its
    # strides through `.to`, and every batched product then made (and autograd kept) a
    # contiguous copy of its own — k four times, q twice. v goes in as it is: only β·v reads
    # it, and that keeps v in its own dtype (a view of the projections, kept anyway). The
    # Triton kernels read these float32 copies too: dense float32 tiles load faster than bf16
    # ones cast up in registers (reports/README.md)
    acc = torch.promote_types(q.dtype, torch.float32)
    return _chunked(*(t.to(acc, memory_format=torch.contiguous_format) for t in (q, k)), v,
                    *(t.to(acc) for t in (log_decay, beta)),
                    None if state is None else state.to(acc), chunk,
                    _use_triton(states, q, acc, chunk, v.shape[-1]))


def _use_triton(states: str, q: torch.Tensor, acc: torch.dtype, chunk: int, dv: int) -> bool:
    if states != "auto":
        return states == "triton"
    # the kernel's sequential products beat the two-level walk only on tensor cores (TF32);
    # in exact float32 it is the slower
    if not (q.is_cuda and acc == torch.float32 and torch.backends.cuda.matmul.allow_tf32):
        return False
    from muse.ops.delta_states.triton import supported  # triton is optional off CUDA

    return supported(chunk, q.shape[-1], dv)


def chunk_layout(q, k, v, log_decay, beta, chunk):
    """The inputs in chunks of T: (qc, kc, vc (B, H, M, T, D), β (B, H, M, T, 1), b the
    cumulative log-decays (B, H, M, T))."""
    bsz, heads, n, _ = q.shape
    m = -(-n // chunk)
    pad = m * chunk - n
    qc, kc, vc = (pad_time(x, pad, 2).view(bsz, heads, m, chunk, -1) for x in (q, k, v))
    bc = pad_time(beta, pad, 2).view(bsz, heads, m, chunk, 1)
    b = torch.cumsum(pad_time(log_decay, pad, 2).view(bsz, heads, m, chunk), dim=-1)
    return qc, kc, vc, bc, b


def decay_ratios(b):
    """γ_t/γ_j = e^{b_t − b_j} for j ≤ t and 0 above, (…, T, T), from b (…, T)."""
    above = above_diagonal(b.shape[-1], b.device)
    return torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(above, -torch.inf))


def _chunked(q, k, v, log_decay, beta, state, chunk, triton):
    bsz, heads, n, dk = q.shape
    dv = v.shape[-1]
    m = -(-n // chunk)
    qc, kc, vc, bc, b = chunk_layout(q, k, v, log_decay, beta, chunk)
    w = b.new_zeros(bsz * heads, dk, dv) if state is None else state.reshape(-1, dk, dv)
    if triton:
        from muse.ops.delta_states.readout import chunk_readout_triton
        from muse.ops.delta_states.solve import chunk_solve_triton
        from muse.ops.delta_states.triton import delta_walk_triton

        # each launch forms its chunk's (T × T) blocks, decayed keys and ratios in registers:
        # none is kept
        kc, b = kc.flatten(0, 1), b.flatten(0, 1)
        u0, p = chunk_solve_triton(kc, vc.flatten(0, 1), bc[..., 0].flatten(0, 1), b)
        entering, fresh, w = delta_walk_triton(p, u0, kc, b, w)
        y = chunk_readout_triton(qc.flatten(0, 1), kc, fresh, entering, b)
        return (y.view(bsz, heads, m * chunk, dv)[:, :, :n],
                w.view(bsz, heads, dk, dv))
    tail_decay = torch.exp(b[..., -1:] - b)[..., None]  # tail: k_j γ_T/γ_j
    through = torch.exp(b[..., -1])[..., None, None]  # γ_T per chunk
    ratio = decay_ratios(b).to(qc.dtype)
    # elementwise chains formed again in backward: their (T × T) and float32 intermediates
    # are not kept
    a = checkpoint(_erase_weights, bc, ratio, kc @ kc.transpose(-1, -2),
                   use_reentrant=False, preserve_rng_state=False)
    gamma = torch.exp(b)[..., None].to(qc.dtype)
    rhs = torch.cat((checkpoint(_widened_product, bc, vc, use_reentrant=False,
                                preserve_rng_state=False),
                     bc * gamma * kc), dim=-1)
    solved = unit_lower_solve(a, rhs)
    u0, p = solved[..., :dv], solved[..., dv:]
    # W_T = (γ_T I − tailᵀP) W_0 + tailᵀU₀: an affine map per chunk, built for all chunks
    # at once, so the sequential part is one batched multiply-add per chunk
    eye_k = torch.eye(dk, dtype=qc.dtype, device=q.device)
    # tailᵀP and tailᵀU₀ from tail's factors (backward forms tail again, not keeping it)
    tail_p, tail_u0 = _ScaledProduct.apply(tail_decay, kc, True, p, u0)
    step = (through * eye_k - tail_p).flatten(0, 1)  # (BH, M, Dk, Dk)
    push = tail_u0.flatten(0, 1)  # (BH, M, Dk, Dv)
    entering, w = _AffineScan.apply(step, push, w)  # (BH, M, Dk, Dv), (BH, Dk, Dv)
    w0 = entering.view(bsz, heads, m, dk, dv)
    fresh = u0 - p @ w0
    qk = qc @ kc.transpose(-1, -2)  # the scores are ratio ⊙ qk, (B, H, M, T, T)
    y = gamma * (qc @ w0) + _ScaledProduct.apply(ratio, qk, False, fresh)[0]
    return y.reshape(bsz, heads, m * chunk, dv)[:, :, :n], w.view(bsz, heads, dk, dv)


def _widened_product(bc, vc):
    """β·v in β's dtype (float32 at least), v cast up first."""
    return bc * vc.to(bc.dtype)


def _erase_weights(bc, ratio, kk):
    """A_tj = β_t (γ_t/γ_j) k_t·k_j below the diagonal, 0 on and above it."""
    diagonal = torch.eye(ratio.shape[-1], dtype=torch.bool, device=ratio.device)
    return bc * ratio.masked_fill(diagonal, 0.0) * kk


class _ScaledProduct(torch.autograd.Function):
    """(s ⊙ m) @ x for each x given, or (s ⊙ m)ᵀ @ x with `transpose`, as one autograd node
    keeping s, m and the xs, not also s ⊙ m: backward forms s ⊙ m again (elementwise) and runs
    the backward of the products and of the ⊙ as autograd does, the products' gradients with
    respect to s ⊙ m added first, so values and gradients are the composition's."""

    @staticmethod
    def forward(ctx, s, m, transpose: bool, *xs):
        ctx.transpose = transpose
        ctx.save_for_backward(s, m, *xs)
        a = s * m
        at = a.transpose(-1, -2) if transpose else a
        return tuple(at @ x for x in xs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        s, m, *xs = ctx.saved_tensors
        need_s, need_m, _, *need_xs = ctx.needs_input_grad
        a = s * m
        at = a.transpose(-1, -2) if ctx.transpose else a
        grad_xs = [at.transpose(-1, -2) @ g if need else None
                   for g, need in zip(grads, need_xs, strict=True)]
        grad_s = grad_m = None
        if need_s or need_m:
            grad_at = None
            for g, x in zip(grads, xs, strict=True):
                part = g @ x.transpose(-1, -2)
                grad_at = part if grad_at is None else grad_at + part
            grad_a = grad_at.transpose(-1, -2) if ctx.transpose else grad_at
            grad_s = (grad_a * m).sum_to_size(s.shape) if need_s else None
            grad_m = (grad_a * s).sum_to_size(m.shape) if need_m else None
        return grad_s, grad_m, None, *grad_xs


def _walk(step, push, w, reverse=False):
    """The two-level walk on CUDA, where each of the loop's M launches costs more than its
    arithmetic; the loop elsewhere."""
    if step.is_cuda:
        return affine_walk(step, push, w, reverse)
    return sequential_walk(step, push, w, reverse)


class _AffineScan(torch.autograd.Function):
    """The chunk-to-chunk steps W_c = push_c + step_c W_{c−1} (muse.ops.affine_walk) as one
    autograd node → the state entering every chunk (BH, M, Dk, Dv) and the state after the
    last. Each entering state is kept once (autograd through the loop would keep it by its
    multiply-add and again in the stack for the read-out). Backward walks the same steps in
    reverse for the gradient reaching each push (from the next step and from the read-out,
    added as autograd adds them); the steps' gradients are then one batched product with the
    entering states."""

    @staticmethod
    def forward(ctx, step, push, w):
        entering, w = _walk(step, push, w)
        ctx.save_for_backward(step, entering)
        return entering, w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_entering, grad_last):
        step, entering = ctx.saved_tensors
        need_step, need_push, need_w = ctx.needs_input_grad
        # the gradient reaching each push, then W₀'s, in one reverse walk
        grad_push, d = _walk(step.transpose(-1, -2), grad_entering, grad_last, reverse=True)
        grad_step = grad_push @ entering.transpose(-1, -2) if need_step else None
        return grad_step, grad_push if need_push else None, d if need_w else None
