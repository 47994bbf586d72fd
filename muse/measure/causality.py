"""Causality probe: logits at positions ≤ t must not move when tokens after t change."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def causal_leak(model: nn.Module, ids: torch.Tensor, t: int, seed: int = 0) -> float:
    """Max |Δlogits| over positions ≤ t after redrawing every token after t (0.0 = causal)."""
    n = ids.shape[1]
    if not 0 <= t < n - 1:
        raise ValueError(f"t must be in [0, {n - 2}] for a sequence of {n} tokens, got {t}")
    gen = torch.Generator().manual_seed(seed)
    perturbed = ids.clone()
    vocab = model.config.vocab_size
    shift = torch.randint(1, vocab, (ids.shape[0], n - t - 1), generator=gen).to(ids.device)
    # A non-zero shift mod V guarantees every future token changes.
    perturbed[:, t + 1 :] = (ids[:, t + 1 :] + shift) % vocab
    before = model(ids)[:, : t + 1]
    after = model(perturbed)[:, : t + 1]
    return float((before - after).abs().max())
