"""Mamba2's start for a per-head scalar decay chosen by the input, log a_t = −A·softplus(w·x_t + b)
(Dao & Gu 2024): A spread over [1, 16] across heads and softplus(b) log-uniform in `dt_range`,
so that at init the heads' memories run from ~1/dt_range[1] to ~1/dt_range[0] tokens."""

from __future__ import annotations

import math

import torch


def mamba2_bias(n_heads: int, dt_range: tuple[float, float]) -> torch.Tensor:
    """b per head with softplus(b) log-uniform over dt_range, slowest head first."""
    lo, hi = map(float, dt_range)
    if not 0 < lo <= hi:
        raise ValueError(f"dt_range must be 0 < low ≤ high, got {tuple(dt_range)}")
    step = torch.exp(torch.linspace(math.log(lo), math.log(hi), n_heads))
    return step + torch.log(-torch.expm1(-step))  # softplus⁻¹


def mamba2_a_log(n_heads: int) -> torch.Tensor:
    """log A per head, A from 1 to 16."""
    return torch.log(torch.linspace(1.0, 16.0, n_heads))
