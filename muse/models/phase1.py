"""Phase 1 — ResNet-BK with the efficiency engine (DESIGN §3.2).

Block: x + BKMixer(LN x), x + ARSSM(LN x) (when its rank is > 0), x + window attention(LN x)
(when `local_window` > 0), x + FFN(LN x). The embedding is HTT (tensor-train factorised, ~0.6% of
V·D at D=512, r=16) or dense; the output head is tied to it unless `head="dense"`.

The default preset `small` is the block that learns as well as its matched transformer on
en-prose (reports/quality): few BK channels starting as a no-op, a wide AR-SSM for the long
range and exact attention over 128 tokens for the short, over a dense table (HTT's factorised
table, as input or as head, costs more perplexity than it saves parameters at an 8k vocabulary).

Streaming: `init_state(B)` and `forward(ids, state)` carry each block's BK boundary value and
AR-SSM state (conv tail and decayed s) across segments, exactly. `zeta_init` starts a dense
token embedding as sinusoids at zeta-zero frequencies (layers.zeta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from muse.layers.ar_ssm import ARSSM
from muse.layers.bk import BKMixer
from muse.layers.embedding import EMBEDDINGS, embedding_table, token_embedding
from muse.layers.local_attention import SlidingWindowAttention
from muse.layers.moe import make_ffn
from muse.models.common import INITS, StreamingLM, gpt2_init
from muse.models.config import FFNConfig
from muse.models.registry import Family, register

HEADS = ("tied", "dense")


@dataclass
class Phase1Config(FFNConfig):
    vocab_size: int = 50257
    d_model: int = 512
    n_layers: int = 6
    bk_channels: int = 32  # independent BK-Core channels per block (C)
    d_ff: int = 2048
    embedding: str = "htt"  # "htt" (compressed) or "dense" (the uncompressed baseline)
    htt_rank: int = 16
    # the dense token embedding starts as sinusoids at zeta-zero frequencies (layers.zeta)
    zeta_init: bool = False
    ar_ssm_rank: int = 32  # 0 leaves the AR-SSM sublayer out
    # AR-SSM decays λ spread over this range at init: λ^16384 is 0.85 at 0.99999, so the
    # state can carry a token across a 16k context.
    ar_ssm_decay_init: tuple[float, float] = (0.999, 0.99999)
    ar_ssm_out_norm: bool = True  # s ⊙ w divided by its RMS over the rank (layers.norm)
    # pre-softplus Im z spread over the channels: Im z from 0.13 (far) to 1.3 (local), BKMixer
    bk_z_imag_init: float | tuple[float, float] = (-2.0, 1.0)  # a float: one value for all
    bk_zero_out: bool = False  # the BK sublayer's output projection starts at 0 (a no-op at init)
    # the output head: "tied" to the embedding (HTT's table when embedding="htt") or "dense", an
    # untied V × D table of its own (V·D more parameters)
    head: str = "tied"
    # w > 0: a sliding-window softmax attention sublayer (layers.local_attention) after the
    # AR-SSM in every block, local_heads × local_head_dim wide; exact recall inside w tokens
    local_window: int = 0
    local_heads: int = 4
    local_head_dim: int = 64
    init: str = "torch"  # "torch" (nn.Linear's own) or "gpt2" (models.common.gpt2_init)
    dropout: float = 0.0
    checkpointing: bool = False  # recompute each block in backward to save activation memory
    backend: str = "auto"  # BK-Core: "auto" (Triton on CUDA), "scan" or "triton"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive_ints(
            "vocab_size", "d_model", "n_layers", "bk_channels", "d_ff", "htt_rank"
        )
        self.require_nonnegative_ints("ar_ssm_rank", "local_window")
        self.require_positive_ints("local_heads", "local_head_dim")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.zeta_init and self.embedding != "dense":
            raise ValueError(
                f"zeta_init initialises a dense token table; embedding={self.embedding!r} has "
                "none (its HTT cores are not a table): set embedding='dense' or zeta_init=False"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class Phase1Block(nn.Module):
    def __init__(self, config: Phase1Config):
        super().__init__()
        d = config.d_model
        self.ln_mix = nn.LayerNorm(d)
        self.mixer = BKMixer(
            d_model=d,
            channels=config.bk_channels,
            backend=config.backend,
            z_imag_init=config.bk_z_imag_init,
        )
        rank = config.ar_ssm_rank
        self.ln_ssm = nn.LayerNorm(d) if rank else None
        self.ssm = (
            ARSSM(d_model=d, rank=rank, decay_init=tuple(config.ar_ssm_decay_init),
                  out_norm=config.ar_ssm_out_norm)
            if rank
            else None
        )
        window = config.local_window
        self.ln_local = nn.LayerNorm(d) if window else None
        self.local = (
            SlidingWindowAttention(d_model=d, n_heads=config.local_heads,
                                   head_dim=config.local_head_dim, window=window)
            if window
            else None
        )
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = make_ffn(
            config.ffn,
            d_model=d,
            d_ff=config.d_ff,
            n_experts=config.moe_experts,
            top_k=config.moe_top_k,
        )
        self.drop = nn.Dropout(config.dropout)

    def init_state(self, batch: int, **where) -> dict:
        state = {"bk": self.mixer.init_carry(batch, **where)}
        if self.ssm is not None:
            state["ssm"] = self.ssm.init_state(batch, **where)
        if self.local is not None:
            state["local"] = self.local.init_state(batch, **where)
        return state

    def forward(self, x: torch.Tensor, state: dict | None = None):
        """x → x; with `state` (this block's part of a StreamState), (x, its next state)."""
        if state is None:
            x = x + self.drop(self.mixer(self.ln_mix(x)))
            if self.ssm is not None:
                x = x + self.drop(self.ssm(self.ln_ssm(x)))
            if self.local is not None:
                x = x + self.drop(self.local(self.ln_local(x)))
            return x + self.drop(self.ffn(self.ln_ffn(x)))
        h, bk = self.mixer(self.ln_mix(x), state["bk"])
        x = x + self.drop(h)
        new = {"bk": bk}
        if self.ssm is not None:
            h, new["ssm"] = self.ssm(self.ln_ssm(x), state["ssm"])
            x = x + self.drop(h)
        if self.local is not None:
            h, new["local"] = self.local(self.ln_local(x), state["local"])
            x = x + self.drop(h)
        return x + self.drop(self.ffn(self.ln_ffn(x))), new


class Phase1LM(StreamingLM):
    """`embed` gives h₀ and `blocks` the layers: the names the gradient-flow probe relies on."""

    def __init__(self, config: Phase1Config):
        super().__init__()
        self.config = config
        self.embed = token_embedding(config.embedding, config.vocab_size, config.d_model,
                                     htt_rank=config.htt_rank, zeta_init=config.zeta_init)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Phase1Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        if config.head == "dense":
            self.head = nn.Parameter(torch.randn(config.vocab_size, config.d_model) * 0.02)
        if config.init == "gpt2":
            gpt2_init(self.blocks, config.n_layers)
        if config.bk_zero_out:
            for block in self.blocks:
                block.mixer.zero_out()

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.embed(input_ids))

    def output_table(self) -> torch.Tensor:
        """logits = h · Eᵀ: E the untied head's table, or the (materialised) embedding table."""
        return self.head if self.config.head == "dense" else embedding_table(self.embed)


_ENGINE = dict(d_model=512, n_layers=6, bk_channels=32, d_ff=2048)
PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, bk_channels=8, d_ff=256, htt_rank=4, ar_ssm_rank=8),
    # memory profiles, named for the GPU memory they target: AR-SSM rank, HTT rank, checkpointing
    "8gb": dict(_ENGINE, ar_ssm_rank=16, htt_rank=8, checkpointing=True),
    "10gb": dict(_ENGINE, ar_ssm_rank=32, htt_rank=16),
    "24gb": dict(_ENGINE, ar_ssm_rank=64, htt_rank=32),
    # the uncompressed baseline of the configuration sweep
    "dense": dict(_ENGINE, ar_ssm_rank=32, embedding="dense"),
    # the default: the block that learns as well as its matched transformer (reports/quality):
    # 8 BK channels whose output starts at 0, a wide AR-SSM, exact attention over 128 tokens
    "small": dict(d_model=512, n_layers=4, bk_channels=8, bk_zero_out=True, d_ff=1152,
                  embedding="dense", ar_ssm_rank=256, local_window=128, init="gpt2"),
}


MATCHED_VOCABS = {50257: "", 8192: "-v8k"}  # vocabulary → suffix of the matched presets


def _matched_transformer(preset: str, vocab_size: int) -> str:
    # tiny is for CPU tests: far too small to match a model carrying a 50k-token vocabulary.
    if preset == "tiny":
        return "tiny"
    # HTT keeps Phase 1's size nearly fixed while a dense table scales with the vocabulary: the
    # presets matched at the nearest vocabulary (a trained BPE may stop a few tokens short);
    # callers that build at another vocabulary check the match (muse.training.quality.check_matched)
    nearest = min(MATCHED_VOCABS, key=lambda v: abs(math.log(v / vocab_size)))
    return f"phase1-{preset}{MATCHED_VOCABS[nearest]}"


register(Family("phase1", Phase1Config, Phase1LM, PRESETS, "small", _matched_transformer))
