"""Causality probe: logits at positions ≤ t must not move when tokens after t change."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


def _redraw_after(ids: torch.Tensor, t: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    perturbed = ids.clone()
    shift = torch.randint(1, vocab, (ids.shape[0], ids.shape[1] - t - 1), generator=gen)
    # A non-zero shift mod V guarantees every future token changes.
    perturbed[:, t + 1 :] = (ids[:, t + 1 :] + shift.to(ids.device)) % vocab
    return perturbed


@torch.no_grad()
def causal_leak(model: nn.Module, ids: torch.Tensor, t: int, seed: int = 0) -> float:
    """Max |Δlogits| over positions ≤ t after redrawing every token after t (0.0 = causal)."""
    n = ids.shape[1]
    if not 0 <= t < n - 1:
        raise ValueError(f"t must be in [0, {n - 2}] for a sequence of {n} tokens, got {t}")
    perturbed = _redraw_after(ids, t, model.config.vocab_size, seed)
    before = model(ids)[:, : t + 1]
    after = model(perturbed)[:, : t + 1]
    return float((before - after).abs().max())


def probe_positions(n: int) -> tuple[int, ...]:
    """Where to cut a sequence of n tokens: the first token, a third (inside any power-of-two
    chunk of a blocked kernel), the middle (a chunk's first token) and the last but one."""
    return tuple(sorted({t for t in (0, n // 3, n // 2, n - 2) if 0 <= t <= n - 2}))


@dataclass(frozen=True)
class CausalProbe:
    positions: tuple[int, ...]  # each t: every token after t redrawn
    leaks: dict[int, float]  # t → max |Δlogits| over positions ≤ t
    rerun_noise: float  # max |Δlogits| between two runs of the same ids

    @property
    def leak(self) -> float:
        return max(self.leaks.values())

    @property
    def causal(self) -> bool:
        return self.leak <= self.rerun_noise


@torch.no_grad()
def causal_probe(model: nn.Module, ids: torch.Tensor, seed: int = 0) -> CausalProbe:
    """The model as it is (dtype, mode, device) on `ids` and on copies whose future tokens are
    redrawn. The first run is a warm-up, so autotuning never sits between compared runs; a
    second run of the same ids gives the noise a leak must exceed."""
    n = ids.shape[1]
    if n < 2:
        raise ValueError(f"a causality probe needs a sequence of ≥ 2 tokens, got {n}")
    model(ids)
    before = model(ids)
    noise = float((model(ids) - before).abs().max())
    vocab = model.config.vocab_size
    leaks = {}
    for i, t in enumerate(probe_positions(n)):
        after = model(_redraw_after(ids, t, vocab, seed + i))
        leaks[t] = float((after[:, : t + 1] - before[:, : t + 1]).abs().max())
    return CausalProbe(probe_positions(n), leaks, noise)
