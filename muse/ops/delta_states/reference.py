"""The delta rule's chunk-to-chunk walk as a loop of batched products, autograd through it.

With each chunk's solve done (U₀, P: muse.ops.delta_rule), chunk c entered with state W_c
holds the values V'_c = U₀ − P W_c and leaves W_{c+1} = γ_T W_c + K̃ᵀ V'_c (K̃: the keys
decayed to the chunk's end, γ_T = e^{b_T}). Only this is sequential; each chunk's output
(γ ⊙ Q) W_c + (R ⊙ QKᵀ) V'_c is then one batched product over all chunks. The Triton kernels
(triton.py) compute the same sums.
"""

from __future__ import annotations

import torch


def _check(what: str, layout: str, want: dict, got: dict) -> None:
    if any(tuple(got[name].shape) != shape for name, shape in want.items()):
        raise ValueError(f"{what} needs {layout}; got "
                         + ", ".join(f"{name} {tuple(v.shape)}" for name, v in got.items()))


def check_shapes(p, u0, k, b, w):
    """Raise a ValueError naming every shape unless they form one walk."""
    seqs, m, t, dk = p.shape
    dv = u0.shape[-1]
    _check("delta_walk", "p, k (S, M, T, Dk), u0 (S, M, T, Dv), b (S, M, T) and w (S, Dk, Dv)",
           dict(p=(seqs, m, t, dk), u0=(seqs, m, t, dv), k=(seqs, m, t, dk), b=(seqs, m, t),
                w=(seqs, dk, dv)),
           dict(p=p, u0=u0, k=k, b=b, w=w))


def tail_keys(k, b):
    """K̃ = the keys decayed to their chunk's end, k_t e^{b_T − b_t}, in b's dtype, and γ_T =
    e^{b_T} (S, M): the walk's two uses of the keys and decays."""
    return k.to(b.dtype) * torch.exp(b[..., -1:] - b)[..., None], torch.exp(b[..., -1])


def delta_walk_reference(p, u0, k, b, w):
    """p, k (S, M, T, Dk); u0 (S, M, T, Dv); b the chunk's cumulative log-decays (S, M, T); w
    the state entering the first chunk (S, Dk, Dv) → (the state entering each chunk (S, M, Dk,
    Dv), each chunk's V' (S, M, T, Dv), the state after the last chunk)."""
    check_shapes(p, u0, k, b, w)
    kt, through = tail_keys(k, b)
    entering, fresh = [], []
    for c in range(p.shape[1]):
        entering.append(w)
        fresh.append(u0[:, c] - p[:, c] @ w)
        w = through[:, c, None, None] * w + kt[:, c].transpose(-1, -2) @ fresh[-1]
    return torch.stack(entering, dim=1), torch.stack(fresh, dim=1), w


def check_readout_shapes(q, k, fresh, entering, b):
    """Raise a ValueError naming every shape unless they form one read-out."""
    seqs, m, t, dk = q.shape
    dv = fresh.shape[-1]
    _check("chunk_readout", "q, k (S, M, T, Dk), fresh (S, M, T, Dv), entering (S, M, Dk, Dv) "
           "and b (S, M, T)",
           dict(q=(seqs, m, t, dk), k=(seqs, m, t, dk), fresh=(seqs, m, t, dv),
                entering=(seqs, m, dk, dv), b=(seqs, m, t)),
           dict(q=q, k=k, fresh=fresh, entering=entering, b=b))


def chunk_readout_reference(q, k, fresh, entering, b):
    """Each chunk's output (γ ⊙ Q) W_c + (R ⊙ QKᵀ) V'_c: q, k (S, M, T, Dk), fresh V'
    (S, M, T, Dv), entering W_c (S, M, Dk, Dv), b the chunk's cumulative log-decays (S, M, T),
    γ_t = e^{b_t}, R_tj = e^{b_t − b_j} for j ≤ t and 0 above → (S, M, T, Dv), in fresh's dtype
    (q and k cast up to it)."""
    check_readout_shapes(q, k, fresh, entering, b)
    q, k = q.to(fresh.dtype), k.to(fresh.dtype)
    t = q.shape[2]
    above = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    ratio = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(above, -torch.inf))
    return torch.exp(b)[..., None] * (q @ entering) + (ratio * (q @ k.transpose(-1, -2))) @ fresh


def check_solve_shapes(k, v, beta, b):
    """Raise a ValueError naming every shape unless they form one chunk solve."""
    seqs, m, t, dk = k.shape
    _check("chunk_solve", "k (S, M, T, Dk), v (S, M, T, Dv), beta and b (S, M, T)",
           dict(k=(seqs, m, t, dk), v=(seqs, m, t, v.shape[-1]), beta=(seqs, m, t),
                b=(seqs, m, t)),
           dict(k=k, v=v, beta=beta, b=b))


def chunk_solve_reference(k, v, beta, b):
    """Each chunk's U₀ = (I + A)⁻¹ diag(β) V and P = (I + A)⁻¹ diag(βγ) K (muse.ops.delta_rule),
    A_tj = β_t e^{b_t − b_j} k_t·k_j below the diagonal: k (S, M, T, Dk), v (S, M, T, Dv), beta
    and b the chunk's cumulative log-decays (S, M, T) → (u0, p), in b's dtype (k and v cast up
    to it)."""
    check_solve_shapes(k, v, beta, b)
    k = k.to(b.dtype)
    t = k.shape[2]
    below = torch.ones(t, t, dtype=torch.bool, device=k.device).tril(-1)
    log_ratio = (b[..., :, None] - b[..., None, :]).masked_fill(~below, -torch.inf)
    a = beta[..., None] * torch.exp(log_ratio) * (k @ k.transpose(-1, -2))
    eye = torch.eye(t, dtype=k.dtype, device=k.device)
    rhs = torch.cat((beta[..., None] * v.to(b.dtype), (beta * torch.exp(b))[..., None] * k), -1)
    x = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    return x[..., :v.shape[-1]], x[..., v.shape[-1]:]
