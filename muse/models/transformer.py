"""GPT-2-style pre-LN Transformer with rotary positions: the baseline every MUSE family is
measured against, and (attention="eager") the O(N²) negative control of the scaling gate.

It streams like the MUSE families (`init_state(B)`, `forward(ids, state)`), its state being a
KV cache: keys (already rotated to their positions) and values of every token so far, so the
state grows with the context where a MUSE family's stays fixed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.layers.local_attention import empty_kv
from muse.layers.mlp import MLP, SwiGLU
from muse.layers.rotary import apply_rotary, rotary_tables  # noqa: F401 (re-exported)
from muse.models.common import StreamingLM
from muse.models.config import StrictConfig
from muse.models.registry import Family, register

ATTENTION_KINDS = ("sdpa", "eager")


@dataclass
class TransformerConfig(StrictConfig):
    vocab_size: int = 50257
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    ffn: str = "mlp"  # "mlp" (GELU, GPT-2) or "swiglu" (Llama's; the same parameters)
    dropout: float = 0.0
    rope_base: float = 10000.0
    attention: str = "sdpa"  # "sdpa": fused (flash on CUDA); "eager": materialises N×N scores
    tie_embeddings: bool = True
    checkpointing: bool = False  # recompute each block in backward to save activation memory

    def __post_init__(self) -> None:
        self.require_positive_ints("vocab_size", "d_model", "n_layers", "n_heads", "d_ff")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads "
                "of even size (rotary positions rotate pairs of channels)"
            )
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be one of mlp, swiglu, got {self.ffn!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


def future_mask(n: int, t: int, device) -> torch.Tensor:
    """(n, t) True where query i (the last n of t positions) would see a later key."""
    return torch.ones(n, t, dtype=torch.bool, device=device).triu(t - n + 1)


def eager_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, n, D) the last n of the t positions of k, v (B, H, t, D)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(future_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    return torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(v.dtype) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.rope_base = config.rope_base
        self.eager = config.attention == "eager"
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        return empty_kv(batch, self.n_heads, self.head_dim, self.qkv.weight, device, dtype)

    def forward(self, x: torch.Tensor, cache: dict | None = None):
        """x (B, n, D) → (B, n, D); with `cache` (the keys and values before x), also the cache
        after x."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = 0 if cache is None else cache["k"].shape[2]
        cos, sin = rotary_tables(past + n, self.head_dim, self.rope_base, x.device, q.dtype)
        q, k = apply_rotary(q, cos[past:], sin[past:]), apply_rotary(k, cos[past:], sin[past:])
        if cache is not None:
            k = torch.cat((cache["k"].to(k.dtype), k), dim=2)
            v = torch.cat((cache["v"].to(v.dtype), v), dim=2)
        if self.eager:
            y = eager_causal_attention(q, k, v)
        else:
            p = self.dropout if self.training else 0.0
            # one new token sees every key; a longer segment after a cache needs the offset mask
            mask = None if past == 0 or n == 1 else ~future_mask(n, past + n, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=past == 0 and n > 1)
        y = self.proj(y.transpose(1, 2).reshape(b, n, d))
        return y if cache is None else (y, {"k": k, "v": v})


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        ffn = SwiGLU if config.ffn == "swiglu" else MLP
        self.mlp = ffn(d_model=config.d_model, d_ff=config.d_ff)
        self.drop = nn.Dropout(config.dropout)

    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        return self.attn.init_state(batch, device, dtype)

    def forward(self, x: torch.Tensor, state: dict | None = None):
        if state is None:
            x = x + self.drop(self.attn(self.ln1(x)))
            return x + self.drop(self.mlp(self.ln2(x)))
        h, state = self.attn(self.ln1(x), state)
        x = x + self.drop(h)
        return x + self.drop(self.mlp(self.ln2(x))), state


class TransformerLM(StreamingLM):
    """`embed` gives h₀ and `blocks` the layers: the names the gradient-flow probe relies on."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/√(2L) so the residual stream keeps unit scale.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.embed(input_ids))

    def output_table(self) -> torch.Tensor:
        return self.lm_head.weight


PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, d_ff=256),
    "small": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024),
    "base": dict(d_model=512, n_layers=6, n_heads=8, d_ff=2048),
    "large": dict(d_model=1024, n_layers=12, n_heads=16, d_ff=4096),
    # matched in parameter count (within 1%) to the Phase 1 presets (tests/models)
    "phase1-8gb": dict(d_model=192, n_layers=8, n_heads=3, d_ff=768),
    "phase1-10gb": dict(d_model=192, n_layers=9, n_heads=3, d_ff=768),
    "phase1-24gb": dict(d_model=192, n_layers=10, n_heads=3, d_ff=768),
    "phase1-dense": dict(d_model=448, n_layers=7, n_heads=7, d_ff=1792),
    "phase1-small": dict(d_model=512, n_layers=3, n_heads=8, d_ff=2048),
    # the same, at an 8192-token vocabulary (the perplexity gate's bpe:8192): HTT keeps Phase 1
    # near 13.5M parameters at any vocabulary while a dense table shrinks from 25.7M to 4.2M,
    # so the transformers matched at 50257 tokens would be 2.4× smaller here
    "phase1-8gb-v8k": dict(d_model=512, n_layers=3, n_heads=8, d_ff=2048),
    "phase1-10gb-v8k": dict(d_model=512, n_layers=3, n_heads=8, d_ff=2048),
    "phase1-24gb-v8k": dict(d_model=384, n_layers=6, n_heads=6, d_ff=1536),
    "phase1-dense-v8k": dict(d_model=448, n_layers=6, n_heads=7, d_ff=1792),
    "phase1-small-v8k": dict(d_model=512, n_layers=3, n_heads=8, d_ff=2048),
    # the shape of phase7:1.5b (its dense head is V·D like this tied table; tests/models)
    "phase7-1.5b": dict(d_model=2048, n_layers=24, n_heads=16, d_ff=8192),
}


def _same_preset(preset: str, vocab_size: int) -> str:
    return preset


def _eager(config: TransformerConfig) -> TransformerLM:
    if config.attention != "eager":
        raise ValueError(
            "transformer-eager is the materialised-attention control: attention must be 'eager'"
        )
    return TransformerLM(config)


register(Family("transformer", TransformerConfig, TransformerLM, PRESETS, "small", _same_preset))
register(
    Family(
        "transformer-eager",
        TransformerConfig,
        _eager,
        {name: {**p, "attention": "eager"} for name, p in PRESETS.items()},
        "small",
        _same_preset,
    )
)
