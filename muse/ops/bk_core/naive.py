"""BK-Core oracle: the sequential recurrences in float64, readable and slow (DESIGN §3.1).

For each sequence and channel, T is tridiagonal with diagonal a_i and off-diagonal products
k_i = b_i c_i, and α_i = a_i − z with Im z > 0.
- causal: g_i = [(T_{0..i} − z)⁻¹]_{ii}, the Green's function of the leading block:
  g_0 = 1/α_0, g_i = 1/(α_i − k_{i−1} g_{i−1}).
- bidirectional: G_ii = 1/(α_i − k_{i−1} gL_{i−1} − k_i gR_{i+1}), gR the same recurrence run
  from the right.
"""

from __future__ import annotations

import torch


def causal_reference(alpha: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """alpha (B, N, C) complex, k (B|1, N−1, C) → g (B, N, C), one position at a time."""
    n = alpha.shape[1]
    out = [1.0 / alpha[:, 0]]
    for i in range(1, n):
        out.append(1.0 / (alpha[:, i] - k[:, i - 1] * out[-1]))
    return torch.stack(out, dim=1)


def bk_core_reference(
    a: torch.Tensor, k: torch.Tensor, z: torch.Tensor, mode: str = "causal"
) -> torch.Tensor:
    """a (B, N, C) real or complex, k (B|1, N−1, C) real ≥ 0, z (C,) complex with Im z > 0 →
    complex128 (B, N, C)."""
    alpha = a.to(torch.complex128) - z.to(torch.complex128)
    k = k.to(torch.float64)
    left = causal_reference(alpha, k)
    if mode == "causal":
        return left
    if mode != "bidirectional":
        raise ValueError(f"mode must be 'causal' or 'bidirectional', got {mode!r}")
    right = causal_reference(alpha.flip(1), k.flip(1)).flip(1)
    denom = alpha.clone()
    denom[:, 1:] -= k * left[:, :-1]
    denom[:, :-1] -= k * right[:, 1:]
    return 1.0 / denom


def dense_resolvent_diagonal(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, z: torch.Tensor, mode: str = "causal"
) -> torch.Tensor:
    """The definition itself, for tests: build T with super-diagonal b and sub-diagonal c
    (b ≠ c allowed: only the products k = b·c enter) and invert T − z densely in float64.
    causal: the last diagonal entry of each leading block's inverse. O(N⁴); small N only."""
    bsz, n, ch = a.shape
    out = torch.empty(bsz, n, ch, dtype=torch.complex128)
    eye = torch.eye(n, dtype=torch.complex128)
    for bi in range(bsz):
        for ci in range(ch):
            t = torch.diag(a[bi, :, ci].to(torch.complex128))
            if n > 1:
                t += torch.diag(b[bi, :, ci].to(torch.complex128), 1)
                t += torch.diag(c[bi, :, ci].to(torch.complex128), -1)
            m = t - z[ci].to(torch.complex128) * eye
            if mode == "bidirectional":
                out[bi, :, ci] = torch.linalg.inv(m).diagonal()
            else:
                for i in range(n):
                    out[bi, i, ci] = torch.linalg.inv(m[: i + 1, : i + 1])[i, i]
    return out
