"""What every language model here does the same way around its blocks."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from muse.errors import MuseError
from muse.layers import count_params
from muse.layers.head import chunked_next_token_loss, tied_logits
from muse.layers.moe import moe_aux_loss, moe_diagnostics

INITS = ("torch", "gpt2")  # a family's `init`: nn.Linear's own, or `gpt2_init`


def gpt2_init(blocks: nn.ModuleList, n_layers: int) -> None:
    """The transformer baseline's init on every Linear weight of the blocks: N(0, 0.02), and
    0.02/√(2L) on the projections that write into the residual stream (GPT-2), so both sides
    of the gate start alike. Biases keep their own init (the decay and gate spreads)."""
    residual = (".out.weight", ".proj_out.weight", ".down.weight")
    for name, module in blocks.named_modules():
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layers) if f"{name}.weight".endswith(residual) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)


def check_input_ids(
    input_ids: torch.Tensor, vocab_size: int | None = None, validate: bool | None = None
) -> None:
    """The model's entry: integer ids [batch ≥ 1, seq ≥ 1], and with `vocab_size` each id in
    [0, vocab_size). The range check reads the ids, which on a GPU waits for them, so by default
    (`validate=None`) it runs on CPU tensors outside torch.compile (there the read would split
    the graph), or everywhere with MUSE_VALIDATE_IDS=1 in the environment; `validate=True`
    forces it, False skips it."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise MuseError(
            f"input_ids must be [batch, seq] with seq ≥ 1, got {tuple(input_ids.shape)}"
        )
    if input_ids.shape[0] < 1:
        raise MuseError(f"input_ids must hold at least one sequence, got batch 0 "
                        f"(shape {tuple(input_ids.shape)})")
    if validate is None:
        validate = ((input_ids.device.type == "cpu" and not torch.compiler.is_compiling())
                    or os.environ.get("MUSE_VALIDATE_IDS") == "1")
    if vocab_size is None or not validate:
        return
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise MuseError(f"token id {int(input_ids[where])} at {list(where)} is out of range: "
                        f"ids must lie in [0, {vocab_size}) for vocab_size {vocab_size}")


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


class StreamingLM(nn.Module):
    """What the MUSE families share around their blocks: the parameter count, the MoE loss and
    diagnostics the trainer reads, and the stateless and streaming forward passes. A family
    sets `config`, `embed` (h₀, the name the gradient-flow probe relies on), `blocks` (each with
    `init_state` and `forward(x, state)`) and `ln_f`; it may override `embed_tokens` and
    `output_table` (the tied head)."""

    def num_params(self) -> int:
        return count_params(self)

    def aux_loss(self) -> torch.Tensor:
        """The MoE load-balancing losses of the last forward, summed (0 without MoE); the
        trainer adds `moe_aux_weight` times this to the language-model loss."""
        return moe_aux_loss(self)

    def diagnostics(self) -> dict[str, float]:
        """Per-step training diagnostics: the MoE expert load (empty without MoE)."""
        return moe_diagnostics(self)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)

    def output_table(self) -> torch.Tensor:
        """The tied head: logits = h · Eᵀ."""
        return self.embed.weight

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> StreamState:
        """The state before any token (every block's recurrences at zero), so
        `forward(ids, init_state(B))` gives the same logits as `forward(ids)`."""
        where = dict(device=device, dtype=dtype)
        return StreamState(batch_size, [b.init_state(batch_size, **where) for b in self.blocks])

    def forward(self, input_ids: torch.Tensor, state: StreamState | None = None, *,
                loss_chunk: int | None = None):
        """logits (B, N, V); with `state`, (logits, the state after these tokens): segments
        run one after another give the logits of one run over their concatenation (with any
        filters on the carried state off). With `loss_chunk`, the mean next-token loss instead,
        its logits made `loss_chunk` positions at a time (layers.head)."""
        check_input_ids(input_ids, self.config.vocab_size)
        x = self.embed_tokens(input_ids)
        if state is None:
            x = self.ln_f(run_blocks(self.blocks, x, self.config.checkpointing))
            if loss_chunk is not None:
                return chunked_next_token_loss(x, self.output_table(), input_ids, loss_chunk)
            return tied_logits(x, self.output_table())
        if loss_chunk is not None:
            raise ValueError("loss_chunk is for the stateless forward: pass no state with it")
        check_state(state, input_ids, len(self.blocks))
        x, blocks = run_blocks_streaming(self.blocks, x, state.blocks, self.config.checkpointing)
        logits = tied_logits(self.ln_f(x), self.output_table())
        return logits, StreamState(state.batch_size, blocks, state.tokens + input_ids.shape[1])
