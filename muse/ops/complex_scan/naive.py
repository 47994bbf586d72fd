"""The per-token definition of the complex diagonal recurrence, which chunk.py must compute."""

from __future__ import annotations

import torch


def complex_recurrence_naive(u: torch.Tensor, lam: torch.Tensor,
                             h0: torch.Tensor | None = None) -> torch.Tensor:
    """The per-token definition: u (B, N, R) complex, λ (R,) complex or (B, N, R) one per step,
    h0 (B, R) → h (B, N, R)."""
    h = torch.zeros_like(u[:, 0]) if h0 is None else h0
    out = []
    for t in range(u.shape[1]):
        h = (lam if lam.dim() == 1 else lam[:, t]) * h + u[:, t]
        out.append(h)
    return torch.stack(out, dim=1)
