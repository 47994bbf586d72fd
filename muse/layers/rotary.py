"""Rotary positions (RoFormer, Su et al. 2021): rotate channel pairs by position·θ_j,
θ_j = base^(−2j/d), so q·k depends on the positions only through their difference."""

from __future__ import annotations

import torch


def rotary_tables(n: int, head_dim: int, base: float, device, dtype) -> tuple[torch.Tensor, ...]:
    # Built per call from the length, so any N works; angles in at least fp32 (fp64 for fp64).
    ct = torch.promote_types(dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=ct) / head_dim)
    angles = torch.outer(torch.arange(n, device=device, dtype=ct), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
