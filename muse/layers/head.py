"""The tied output head: logits = h · Eᵀ over a vocabulary padded to a multiple of 64.

A 50257-row table (GPT-2's vocabulary) is not a multiple of 8, and cuBLAS then falls back to a
slow kernel. Zero rows padded on and sliced off change no logit (beyond
the rounding of a differently blocked product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD_MULTIPLE = 64


def tied_logits(h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """h (…, D), table (V, D) → logits (…, V)."""
    vocab = table.shape[0]
    pad = -vocab % PAD_MULTIPLE
    if pad:
        table = torch.cat((table, table.new_zeros(pad, table.shape[1])))
    return F.linear(h, table.to(h.dtype))[..., :vocab]
