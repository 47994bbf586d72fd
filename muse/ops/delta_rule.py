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

from muse.ops.decayed_scan.chunk import above_diagonal, pad_time


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


def delta_rule_chunked(q, k, v, log_decay, beta, state=None, chunk: int = 64):
    """Same contract as `delta_rule_naive`; O(N·T) work in batched chunk products plus a
    triangular solve per chunk, and N/T sequential (D_k × D_v) state steps. Padding at the end
    has zero keys and β, log-decay 0: it leaves the final state as it is."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")
    # the triangular solve has no half-precision kernels, and its error grows with T: the whole
    # form runs in float32 at least, autocast or not, and returns in that dtype
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        return _chunked(*(t.to(acc) for t in (q, k, v, log_decay, beta)),
                        None if state is None else state.to(acc), chunk)


def _chunked(q, k, v, log_decay, beta, state, chunk):
    bsz, heads, n, dk = q.shape
    dv = v.shape[-1]
    m = -(-n // chunk)
    pad = m * chunk - n
    qc, kc, vc = (pad_time(x, pad, 2).view(bsz, heads, m, chunk, -1) for x in (q, k, v))
    bc = pad_time(beta, pad, 2).view(bsz, heads, m, chunk, 1)
    b = torch.cumsum(pad_time(log_decay, pad, 2).view(bsz, heads, m, chunk), dim=-1)
    above = above_diagonal(chunk, q.device)
    ratio = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(above, -torch.inf))
    ratio = ratio.to(qc.dtype)  # γ_t/γ_j for j ≤ t, 0 above the diagonal
    strict = ratio.masked_fill(torch.eye(chunk, dtype=torch.bool, device=q.device), 0.0)
    a = bc * strict * (kc @ kc.transpose(-1, -2))
    eye = torch.eye(chunk, dtype=qc.dtype, device=q.device)
    gamma = torch.exp(b)[..., None].to(qc.dtype)
    rhs = torch.cat((bc * vc, bc * gamma * kc), dim=-1)
    solved = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    u0, p = solved[..., :dv], solved[..., dv:]
    scores = ratio * (qc @ kc.transpose(-1, -2))  # (B, H, M, T, T)
    tail = torch.exp(b[..., -1:] - b)[..., None].to(kc.dtype) * kc  # k_j γ_T/γ_j
    through = torch.exp(b[..., -1]).to(qc.dtype)[..., None, None]  # γ_T per chunk
    # W_T = (γ_T I − tailᵀP) W_0 + tailᵀU₀: an affine map per chunk, built for all chunks at
    # once, so the sequential part is one batched multiply-add per chunk
    eye_k = torch.eye(dk, dtype=qc.dtype, device=q.device)
    step = (through * eye_k - tail.transpose(-1, -2) @ p).flatten(0, 1)  # (BH, M, Dk, Dk)
    push = (tail.transpose(-1, -2) @ u0).flatten(0, 1)  # (BH, M, Dk, Dv)
    w = q.new_zeros(bsz * heads, dk, dv) if state is None else state.reshape(-1, dk, dv)
    entering = []
    # unbind, not step[:, c]: the backward of M selections would add M full-size zero tensors
    for step_c, push_c in zip(step.unbind(1), push.unbind(1), strict=True):
        entering.append(w)
        w = torch.baddbmm(push_c, step_c, w)
    w0 = torch.stack(entering, dim=1).view(bsz, heads, m, dk, dv)
    y = gamma * (qc @ w0) + scores @ (u0 - p @ w0)
    return y.reshape(bsz, heads, m * chunk, dv)[:, :, :n], w.view(bsz, heads, dk, dv)
