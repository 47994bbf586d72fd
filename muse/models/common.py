"""What every language model here does the same way around its blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {key: _detach(v) for key, v in value.items()}
    return value


@dataclass
class StreamState:
    """What a streaming model carries from one segment to the next: one dict of tensors per
    block (its recurrences' values after the last token) and the number of tokens seen."""

    batch_size: int
    blocks: list[dict[str, Any]]
    tokens: int = 0

    def detach(self) -> StreamState:
        """The same values cut from the graph: truncated backpropagation across segments."""
        return StreamState(self.batch_size, [_detach(b) for b in self.blocks], self.tokens)


def check_state(state: StreamState, input_ids: torch.Tensor, n_blocks: int) -> None:
    if not isinstance(state, StreamState):
        raise TypeError(f"state must be a StreamState from model.init_state, got {type(state)}")
    if state.batch_size != input_ids.shape[0] or len(state.blocks) != n_blocks:
        raise ValueError(
            f"state is for batch {state.batch_size} and {len(state.blocks)} blocks, but "
            f"input_ids has batch {input_ids.shape[0]} and the model {n_blocks} blocks"
        )


def run_blocks_streaming(
    blocks: nn.ModuleList, x: torch.Tensor, states: list[dict[str, Any]], checkpointing: bool
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """`run_blocks` for streaming: each block maps (x, its state) to (x, its next state)."""
    out = []
    for block, state in zip(blocks, states, strict=True):
        if checkpointing and block.training and torch.is_grad_enabled():
            x, state = checkpoint(block, x, state, use_reentrant=False)
        else:
            x, state = block(x, state)
        out.append(state)
    return x, out
