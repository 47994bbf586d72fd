"""The tied output head: logits = h · Eᵀ over a vocabulary padded to a multiple of 64, and the
next-token loss through it in chunks (the memory-efficient loss: the logits never exist whole).

A 50257-row table (GPT-2's vocabulary) is not a multiple of 8, and cuBLAS then falls back to a
slow kernel. Zero rows padded on and sliced off change no logit (beyond
the rounding of a differently blocked product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PAD_MULTIPLE = 64


def tied_logits(h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """h (…, D), table (V, D) → logits (…, V)."""
    vocab = table.shape[0]
    pad = -vocab % PAD_MULTIPLE
    if pad:
        table = torch.cat((table, table.new_zeros(pad, table.shape[1])))
    return F.linear(h, table.to(h.dtype))[..., :vocab]


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least (float64 stays float64): the precision a loss is taken in."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _summed_loss(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(wide(tied_logits(h, table)), targets, reduction="sum")


def chunked_next_token_loss(h: torch.Tensor, table: torch.Tensor, input_ids: torch.Tensor,
                            chunk: int) -> torch.Tensor:
    """The mean cross-entropy of input_ids[:, t+1] given h[:, t] (h (B, N, D), table (V, D)), in
    chunks of `chunk` positions: one chunk's logits exist at a time, in the forward and again
    in the backward (recomputed), never the whole (B·N × V) of them."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"loss chunk must be an integer ≥ 1 (positions per chunk), got {chunk!r}")
    hs = h[:, :-1].reshape(-1, h.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    total = wide(h.new_zeros(()))
    for start in range(0, targets.numel(), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_summed_loss, hs[part], table, targets[part],
                                   use_reentrant=False)
    return total / targets.numel()
