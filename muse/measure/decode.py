"""Decoding after a long prompt: the size of the state a model carries, its decode speed and
the memory decoding takes.

The prompt (random ids, batch 1) runs through the streaming forward in segments of at most
`segment` tokens, so the prefill never needs the whole prompt's activations at once; then
`new_tokens` greedy tokens are decoded one segment of one token at a time. A MUSE family's
state is fixed in size whatever the prompt; the transformer's KV cache grows with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from muse.measure.phases import autocast, random_ids, synchronize


@dataclass(frozen=True)
class DecodeStats:
    prompt: int
    new_tokens: int
    state_bytes: int  # the carried state after the prompt
    seconds: float  # decoding the new tokens, prefill excluded
    peak_bytes: int | None  # CUDA allocator peak while decoding (None off CUDA)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


def state_bytes(value: Any) -> int:
    """Bytes of every tensor in a state: a StreamState, or its nested dicts and lists."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    blocks = getattr(value, "blocks", None)
    return 0 if blocks is None else state_bytes(blocks)


@torch.inference_mode()
def measure_decode(model: nn.Module, prompt: int, new_tokens: int, device: torch.device,
                   dtype: torch.dtype, segment: int = 4096) -> DecodeStats:
    if prompt < 1 or new_tokens < 1 or segment < 1:
        raise ValueError(f"prompt, new_tokens and segment must be ≥ 1, got {prompt}, "
                         f"{new_tokens}, {segment}")
    model.eval()
    ids = random_ids(model.config.vocab_size, 1, prompt, device)
    cuda = device.type == "cuda"
    with autocast(device, dtype):
        state = model.init_state(1, device=device)
        for start in range(0, prompt, segment):
            logits, state = model(ids[:, start:start + segment], state)
        size = state_bytes(state)
        token = logits[:, -1:].argmax(-1)
        del logits
        synchronize(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        for _ in range(new_tokens):
            logits, state = model(token, state)
            token = logits[:, -1:].argmax(-1)
        synchronize(device)
        seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return DecodeStats(prompt, new_tokens, size, seconds, peak)
