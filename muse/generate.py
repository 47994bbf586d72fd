"""Sampling from a language model token by token, through its streaming state.

Every model here streams (`init_state`, `forward(ids, state)`): the MUSE families carry fixed-size
recurrent states, so a token costs the same memory after 64k tokens of prompt as after 10, and the
transformer carries a KV cache that grows with the context. The prompt runs as one segment, then
each new token as a segment of one; the sampling code is the same for every model. A model
without a streaming state (the fla peers) reruns the whole text for each new token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1 leave the distribution whole."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not self.temperature >= 0:
            raise ValueError(f"temperature must be ≥ 0 (0: greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer ≥ 0 (0: off), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")


def filtered_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(B, V) logits over temperature, −inf outside the top k and outside the smallest set of
    tokens whose probability reaches top_p (the most likely token always stays)."""
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # the mass of the tokens ranked above
        outside = before >= sampling.top_p
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, outside)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits of the last position → (B,) token ids."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filtered_logits(logits, sampling), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int,
             sampling: Sampling = Sampling(), generator: torch.Generator | None = None
             ) -> Iterator[torch.Tensor]:
    """prompt (B, n ≥ 1) token ids → yields max_new_tokens (B,) tensors of new ids, one at a
    time, each fed back as the next segment."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, n ≥ 1) token ids, got shape "
                         f"{tuple(prompt.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
    if not hasattr(model, "init_state"):  # a model that does not stream reruns its prefix
        text = prompt
        for _ in range(max_new_tokens):
            token = next_tokens(model(text)[:, -1], sampling, generator)
            yield token
            text = torch.cat((text, token[:, None]), dim=1)
        return
    state = model.init_state(prompt.shape[0], device=prompt.device)
    logits, state = model(prompt, state)
    for i in range(max_new_tokens):
        token = next_tokens(logits[:, -1], sampling, generator)
        yield token
        if i + 1 < max_new_tokens:
            logits, state = model(token[:, None], state)
