"""Phase 8 — causal linear attention (DESIGN §3.6).

Block: x → LN → causal linear attention φ(q)ᵀ(Σ φ(k) vᵀ) / φ(q)·Σ φ(k), φ = elu + 1
(layers.linear_attention) → +; → LN → FFN → +. Dense embedding tied to the head.

The mixer keeps the specified feature map and normaliser; around it sit the read-out pieces
that made the MUSE mixers learn (reports/quality): a short causal conv on q, k, v (`conv`), a
per-head RMSNorm with a gain times SiLU(W_g x) on the output (`out_gate`), GPT-2 init (`init`).
None changes what is mixed across tokens. By default S and z also decay per head at a rate the
input chooses (`decay`, Mamba2's parameterisation: gated linear attention, QUALITY.md item 3),
except in one head that keeps everything (`decay_plain_heads`); the `-plain` presets leave the
decay out. `local_window`
adds exact softmax attention over the last w tokens as a sublayer of its own (64 by default,
what the en-prose gate rewarded; the `-linear` presets leave it out).

Streaming: `init_state(B)` and `forward(ids, state)` carry each block's S (Dk × Dv), z (Dk), conv
tail and window keys and values across segments, exactly. `backend` picks the kernel: "torch"
(chunked, anywhere), "fla" (CUDA with flash-linear-attention), "auto" (= "torch", see
layers.linear_attention); the backend a forward ran shows in each mixer's repr.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from muse.layers.embedding import dense_embedding
from muse.layers.linear_attention import BACKENDS, DECAYS, CausalLinearAttention
from muse.layers.local_attention import SlidingWindowAttention
from muse.layers.moe import make_ffn
from muse.models.common import INITS, StreamingLM, gpt2_init
from muse.models.config import FFNConfig
from muse.models.registry import Family, register


@dataclass
class Phase8Config(FFNConfig):
    vocab_size: int = 50257
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 64
    # the mixer holds 5·D² (q, k, v, gate, out) to attention's 4·D² and the window ~D²/2: the
    # FFN gives that back, 2.5·D instead of the transformer's 4·D, so the presets match it
    d_ff: int = 640
    conv: int = 4  # short causal conv + SiLU on q, k, v: kernel size, 0 = none
    out_gate: bool = True  # per-head RMSNorm with a gain × SiLU(W_g x) on the read-out
    chunk: int = 64  # tokens per chunk of the chunked form
    # "mamba2": S and z decay per head by a_t chosen by the input (a gated decay, beyond
    # DESIGN §3.6's plain linear attention; "none": without it), softplus(b) log-uniform in
    # decay_dt_range at init; the first decay_plain_heads heads keep all they write
    # (layers.linear_attention), so a gradient reaches 65,536 tokens back while the others
    # forget within ~10³ tokens at init
    decay: str = "mamba2"
    decay_dt_range: tuple[float, float] = (1e-3, 0.1)
    decay_plain_heads: int = 1
    # keep only q, k, v and the decays of the decayed form for backward, its chunk products
    # formed again there (opt-in: less peak memory, but it recomputes matmuls, which costs
    # tokens/s)
    recompute_chunks: bool = False
    backend: str = "auto"  # "auto" (= "torch" for now), "torch" or "fla" (layers.linear_attention)
    init: str = "gpt2"  # "torch" (nn.Linear's own) or "gpt2": N(0, 0.02), residual out / √(2L)
    checkpointing: bool = False
    # w > 0: a sliding-window softmax attention sublayer after the mixer (Based's pairing of
    # linear attention with exact local attention), local_heads × local_head_dim wide; 0: none
    local_window: int = 64
    local_heads: int = 2
    local_head_dim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive_ints("vocab_size", "d_model", "n_layers", "n_heads", "head_dim",
                                   "d_ff", "chunk")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        self.require_nonnegative_ints("conv", "local_window", "decay_plain_heads")
        if self.decay_plain_heads and not (self.decay != "none"
                                           and self.decay_plain_heads < self.n_heads):
            raise ValueError(f"decay_plain_heads ({self.decay_plain_heads}) needs decay 'mamba2' "
                             f"and fewer than n_heads ({self.n_heads}) heads, got decay "
                             f"{self.decay!r}")
        self.require_positive_ints("local_heads", "local_head_dim")


class Phase8Block(nn.Module):
    def __init__(self, config: Phase8Config):
        super().__init__()
        d = config.d_model
        self.ln_attn = nn.LayerNorm(d)
        self.attn = CausalLinearAttention(
            d_model=d, n_heads=config.n_heads, head_dim=config.head_dim, chunk=config.chunk,
            backend=config.backend, conv=config.conv, out_gate=config.out_gate,
            decay=config.decay, dt_range=tuple(config.decay_dt_range),
            plain_heads=config.decay_plain_heads, recompute=config.recompute_chunks,
        )
        window = config.local_window
        self.ln_local = nn.LayerNorm(d) if window else None
        self.local = (SlidingWindowAttention(d_model=d, n_heads=config.local_heads,
                                             head_dim=config.local_head_dim, window=window)
                      if window else None)
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = make_ffn(config.ffn, d_model=d, d_ff=config.d_ff,
                            n_experts=config.moe_experts, top_k=config.moe_top_k)

    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        state = self.attn.init_state(batch, device, dtype)
        if self.local is not None:
            state["local"] = self.local.init_state(batch, device, dtype)
        return state

    def forward(self, x, state: dict | None = None):
        if state is None:
            x = x + self.attn(self.ln_attn(x))
            if self.local is not None:
                x = x + self.local(self.ln_local(x))
            return x + self.ffn(self.ln_ffn(x))
        h, new = self.attn(self.ln_attn(x), state)
        x = x + h
        if self.local is not None:
            h, new["local"] = self.local(self.ln_local(x), state["local"])
            x = x + h
        return x + self.ffn(self.ln_ffn(x)), new


class Phase8LM(StreamingLM):
    """`embed` gives h₀ and `blocks` the layers: the names the gradient-flow probe relies on."""

    def __init__(self, config: Phase8Config):
        super().__init__()
        self.config = config
        self.embed = dense_embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Phase8Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        if config.init == "gpt2":
            gpt2_init(self.blocks, config.n_layers)


# the transformer's shapes (heads of 64 as its heads are D / H), d_ff cut to pay for the window:
# within 2% of the transformer preset of the same name at 50257 and 8192 tokens
# (tests/models/test_phase8.py). The bare presets carry the config's gated decay with one plain
# head; "-plain" is DESIGN §3.6's block without a decay, "-linear" that block without the window
# either (d_ff 3.5·D, the block the first gate judged), "-wide" the plain block with one head as
# wide as all (the same parameters, an H× larger state), "-decay" and "-wide-decay" the decay in
# every head, "-longdecay" the decay in every head from dt 1e-5 (memories of ~10⁵ tokens at
# init) instead of a plain head (reports/quality/README.md compares them).
_SHAPES = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, head_dim=32, d_ff=160, local_head_dim=16),
    "small": dict(d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=640),
    "base": dict(d_model=512, n_layers=6, n_heads=8, head_dim=64, d_ff=1536),
}
PRESETS = {}
for _name, _d_ff in (("tiny", 224), ("small", 896), ("base", 1792)):
    _plain = {**_SHAPES[_name], "decay": "none", "decay_plain_heads": 0}
    _width = _plain["n_heads"] * _plain["head_dim"]
    _wide = {**_plain, "n_heads": 1, "head_dim": _width}
    _all_decay = {"decay": "mamba2", "decay_plain_heads": 0}
    PRESETS.update({
        _name: dict(_SHAPES[_name]),
        f"{_name}-plain": _plain,
        f"{_name}-linear": {**_plain, "local_window": 0, "d_ff": _d_ff},
        f"{_name}-wide": _wide,
        f"{_name}-decay": {**_plain, **_all_decay},
        f"{_name}-wide-decay": {**_wide, **_all_decay},
        f"{_name}-longdecay": {**_plain, **_all_decay, "decay_dt_range": (1e-5, 0.1)},
    })


def _same_preset(preset: str, vocab_size: int) -> str:
    return preset.split("-")[0]


register(Family("phase8", Phase8Config, Phase8LM, PRESETS, "small", _same_preset))
