"""The delta rule's chunk pass as a loop of batched products, autograd through it.

With each chunk's solve done (U₀, P: muse.ops.delta_rule), chunk c entered with state W reads

    V' = U₀ − P W,    Y = (γ ⊙ Q) W + (R ⊙ QKᵀ) V',    W ← γ_T W + K̃ᵀ V',

with R the in-chunk decay ratios (0 above the diagonal) and K̃ the keys decayed to the chunk's
end. The Triton kernels (triton.py) compute the same sums.
"""

from __future__ import annotations

import torch


def check_shapes(qg, kt, qk, ratio, u0, p, through, w):
    """Raise a ValueError naming every shape unless they form one chunk pass."""
    seqs, m, t, dk = qg.shape
    dv = u0.shape[-1]
    want = dict(qg=(seqs, m, t, dk), kt=(seqs, m, t, dk), qk=(seqs, m, t, t),
                ratio=(seqs, m, t, t), u0=(seqs, m, t, dv), p=(seqs, m, t, dk),
                through=(seqs, m), w=(seqs, dk, dv))
    got = dict(qg=qg, kt=kt, qk=qk, ratio=ratio, u0=u0, p=p, through=through, w=w)
    if any(tuple(got[k].shape) != v for k, v in want.items()):
        raise ValueError("delta_states needs qg, kt, p (S, M, T, Dk), qk, ratio (S, M, T, T), "
                         "u0 (S, M, T, Dv), through (S, M), w (S, Dk, Dv); got "
                         + ", ".join(f"{k} {tuple(v.shape)}" for k, v in got.items()))


def delta_states_reference(qg, kt, qk, ratio, u0, p, through, w):
    """qg = γ ⊙ q, kt = K̃, p (S, M, T, Dk); qk, ratio (S, M, T, T); u0 (S, M, T, Dv); through
    γ_T (S, M); w the state entering the first chunk (S, Dk, Dv) → (y (S, M, T, Dv), the
    state after the last chunk)."""
    check_shapes(qg, kt, qk, ratio, u0, p, through, w)
    ys = []
    for c in range(qg.shape[1]):
        fresh = u0[:, c] - p[:, c] @ w
        ys.append(qg[:, c] @ w + (ratio[:, c] * qk[:, c]) @ fresh)
        w = through[:, c, None, None] * w + kt[:, c].transpose(-1, -2) @ fresh
    return torch.stack(ys, dim=1), w
