"""The dense token embedding: a V × D table at GPT-2's N(0, 0.02), or zeta sinusoids."""

from __future__ import annotations

import torch
from torch import nn

from muse.layers.zeta import zeta_token_table


def dense_embedding(vocab_size: int, d_model: int, zeta_init: bool = False) -> nn.Embedding:
    """An nn.Embedding at N(0, 0.02); with `zeta_init`, its rows start as sinusoids at
    zeta-zero frequencies (layers.zeta). Its weight doubles as the tied output head's table."""
    embed = nn.Embedding(vocab_size, d_model)
    nn.init.normal_(embed.weight, std=0.02)
    if zeta_init:
        with torch.no_grad():
            embed.weight.copy_(zeta_token_table(vocab_size, d_model))
    return embed
