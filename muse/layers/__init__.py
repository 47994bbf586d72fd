"""Layers: nn.Modules, one concept per file."""

from __future__ import annotations

from torch import nn


def count_params(module: nn.Module) -> int:
    """The number of parameters in `module`, a tensor shared by two places (a tied head)
    counted once; every `num_params()` method here returns this."""
    return sum(p.numel() for p in module.parameters())
