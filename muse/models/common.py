"""What every language model here does the same way around its blocks."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def check_input_ids(input_ids: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids must be [batch, seq] with seq ≥ 1, got {tuple(input_ids.shape)}"
        )


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """Each block in turn; with checkpointing, a training pass keeps only block inputs and
    recomputes the rest in backward."""
    for block in blocks:
        if checkpointing and block.training and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x
