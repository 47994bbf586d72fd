"""Token embeddings: a dense V × D table at GPT-2's N(0, 0.02) (or zeta sinusoids), or HTT's
tensor-train factorised table (layers.htt)."""

from __future__ import annotations

import torch
from torch import nn

from muse.layers.htt import HTTEmbedding
from muse.layers.zeta import zeta_token_table

EMBEDDINGS = ("htt", "dense")


def dense_embedding(vocab_size: int, d_model: int, zeta_init: bool = False) -> nn.Embedding:
    """An nn.Embedding at N(0, 0.02); with `zeta_init`, its rows start as sinusoids at
    zeta-zero frequencies (layers.zeta). Its weight doubles as the tied output head's table."""
    embed = nn.Embedding(vocab_size, d_model)
    nn.init.normal_(embed.weight, std=0.02)
    if zeta_init:
        with torch.no_grad():
            embed.weight.copy_(zeta_token_table(vocab_size, d_model))
    return embed


def token_embedding(kind: str, vocab_size: int, d_model: int, *, htt_rank: int,
                    zeta_init: bool = False) -> nn.Module:
    """`kind` "htt" (compressed) or "dense" (EMBEDDINGS)."""
    if kind == "htt":
        return HTTEmbedding(vocab_size=vocab_size, d_model=d_model, rank=htt_rank)
    if kind == "dense":
        return dense_embedding(vocab_size, d_model, zeta_init)
    raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {kind!r}")


def embedding_table(embed: nn.Module) -> torch.Tensor:
    """The V × D table a tied head reads: the dense weight, or HTT's table materialised."""
    return embed.weight if isinstance(embed, nn.Embedding) else embed.full_table()
