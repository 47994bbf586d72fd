"""Phase 7 — hybrid hyperbolic (DESIGN §3.5).

Block: h = LN x; x + [g ⊙ local(h) + (1 − g) ⊙ global(h)]; then x + FFN(LN x).
- local: causal Poincaré-ball attention in sliding windows of w tokens (layers.hyperbolic),
  scores −β·d_c(q, k) from norms and dot products, O(N·w);
- global: AR-SSM (layers.ar_ssm), decays spread to carry tokens across long contexts;
- g = σ(s · P(|Im G|)) ∈ (0, 1)^D: G (B, N, C) the BK-Core output of a BKMixer's resolvent
  path over C channels, P a Linear(C → D), s a learned scalar. P rather than broadcasting:
  broadcasting would need C = D BK channels (two D×D input projections and an O(N·D) complex
  scan per block); C ≪ D channels with a C×D projection cost C·D parameters and let every
  model channel choose its own mix of BK channels. P's bias starts at 0, so g starts near 0.5.

Embedding and head: the presets `small` and `base` use a dense tied table; `1.5b` (and the
config's defaults) an HTT (tensor-train factorised) embedding with an untied dense V × D head,
for memory. HTT's table costs perplexity as a head and as an input (reports/quality: Phase 1 on
a GPU, Phase 7 in cpu-screen-6). `embedding` and `head` reach every combination. GPT-2 init.

Streaming: `init_state(B)` and `forward(ids, state)` carry each block's window keys and values
(the last w − 1), AR-SSM state (conv tail, decayed s) and BK boundary value, exactly.

Kept for backward (scripts/saved_activations.py counts it): the seven projections reading LN x
share one autocast copy of it (layers.cast), the mix by the gate is one node keeping P(|Im G|)
rather than g and 1 − g (`gated_mix`), and the window attention keeps q, k, v and its dot
products formed again in backward (layers.hyperbolic, `recompute_dot`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.layers.ar_ssm import ARSSM
from muse.layers.bk import BKMixer, _wide
from muse.layers.cast import autocast_read
from muse.layers.embedding import EMBEDDINGS, embedding_table, token_embedding
from muse.layers.hyperbolic import PoincareWindowAttention
from muse.layers.moe import make_ffn
from muse.models.common import INITS, StreamingLM, gpt2_init
from muse.models.config import FFNConfig
from muse.models.registry import Family, register
from muse.ops.bk_core import bk_core

HEADS = ("dense", "tied")


@dataclass
class Phase7Config(FFNConfig):
    vocab_size: int = 50257
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4  # local attention heads
    head_dim: int = 64
    d_ff: int = 1024
    window: int = 128  # the local attention's window w: token t sees t−w+1 … t
    curvature: float = 1.0  # c of the Poincaré ball (curvature −c)
    beta_init: float = 1.0  # β per head at init (learned, > 0)
    # the local attention forms its key–query dot products again in backward rather than keep
    # them: 2·w·H bytes a token and layer less (bf16) for one more batched matmul in backward
    recompute_dot: bool = True
    rope_base: float = 10000.0
    ar_ssm_rank: int = 32
    # λ spread over this range at init: λ^16384 = 0.85 at 0.99999, so the global path can carry
    # a token across a 16k context (the window covers the short range)
    ar_ssm_decay_init: tuple[float, float] = (0.999, 0.99999)
    bk_channels: int = 16  # BK-Core channels of the gate (C)
    # pre-softplus Im z spread over the channels (BKMixer): some reach far back, some stay local
    bk_z_imag_init: float | tuple[float, float] = (-2.0, 1.0)
    embedding: str = "htt"  # "htt" (compressed) or "dense" (a V × D table)
    htt_rank: int = 16
    head: str = "dense"  # "dense": an untied V × D table; "tied": the embedding's table
    init: str = "gpt2"  # "torch" (nn.Linear's own) or "gpt2" (models.common.gpt2_init)
    checkpointing: bool = False  # recompute each block in backward to save activation memory
    backend: str = "auto"  # BK-Core: "auto" (Triton on CUDA), "scan" or "triton"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_positive_ints("vocab_size", "d_model", "n_layers", "n_heads", "head_dim",
                                   "d_ff", "window", "ar_ssm_rank", "bk_channels", "htt_rank")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary positions rotate channel pairs), "
                             f"got {self.head_dim}")
        for key in ("curvature", "beta_init", "rope_base"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{key} must be a number > 0, got {value!r}")
        lo, hi = self.ar_ssm_decay_init
        if not 0 < lo <= hi < 1:
            raise ValueError(f"ar_ssm_decay_init must satisfy 0 < lo ≤ hi < 1, got "
                             f"{self.ar_ssm_decay_init!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.backend not in ("auto", "scan", "triton"):
            raise ValueError(f"backend must be one of ('auto', 'scan', 'triton'), got "
                             f"{self.backend!r}")


class BKGate(BKMixer):
    """g = σ(s · P(|Im G|)) (B, N, D) from the BK-Core output G (B, N, C) of BKMixer's
    resolvent path; BKMixer's own output projection is not used, so it is removed."""

    def __init__(self, *, d_model: int, channels: int, **kwargs):
        super().__init__(d_model=d_model, channels=channels, **kwargs)
        del self.out  # the gate reads |Im G| through `proj`, not [Re G, Im G] through `out`
        self.proj = nn.Linear(channels, d_model)
        nn.init.zeros_(self.proj.bias)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, carry: torch.Tensor | None = None, *,
                logit: bool = False):
        """x (B, N, D) → g; with `carry` (B, C) also the next boundary value (as BKMixer). With
        `logit`, P(|Im G|) in g's place (g before σ(s ·), for `gated_mix`)."""
        # each projection reads the one autocast copy of x (layers.cast)
        a = self.diagonal(autocast_read(x))
        if carry is None:
            # k_i from x_i: g_i sees x_{≤i}. Formed for every token and the last dropped: the
            # projection then reads the shared copy whole, where a slice would be read strided
            # (another matmul path) or copied (another tensor to keep)
            k = F.softplus(_wide(self.coupling(autocast_read(x))[:, :-1]))
        else:
            k_all = F.softplus(_wide(self.coupling(autocast_read(x))))
            a = torch.cat((a[:, :1] - carry[:, None], a[:, 1:]), dim=1)
            k = k_all[:, :-1]
        green = bk_core(a, k, self.shift(), backend=self.backend, validate=False)
        gate = self.proj(green.imag.abs().to(x.dtype))
        if not logit:
            gate = torch.sigmoid(self.scale * gate)
        if carry is None:
            return gate
        return gate, k_all[:, -1] * green[:, -1]


class _GatedMix(torch.autograd.Function):
    """x + g ⊙ loc + (1 − g) ⊙ glob with g = σ(s·p), as one autograd node: it keeps p, s, loc and
    glob and forms g and 1 − g again in backward (elementwise), where autograd through the plain
    expression keeps g and 1 − g besides. Each step is formed in the dtype autograd would use
    (under bf16 autocast: p, g, loc, glob and the products bf16, x and the sum float32), so
    values and gradients are autograd's through the plain expression."""

    @staticmethod
    def forward(ctx, x, p, scale, loc, glob):
        ctx.save_for_backward(p, scale, loc, glob)
        ctx.x_dtype = x.dtype
        g = torch.sigmoid(scale * p)
        return x + g * loc + (1 - g) * glob

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        p, scale, loc, glob = ctx.saved_tensors
        g = torch.sigmoid(scale * p)
        rest = 1 - g
        # the sum's gradient reaches each product in the product's dtype
        grad_a = grad.to(torch.promote_types(g.dtype, loc.dtype))
        grad_b = grad.to(torch.promote_types(rest.dtype, glob.dtype))
        grad_g = (grad_a * loc).to(g.dtype) + (-(grad_b * glob)).to(g.dtype)
        grad_t = torch.ops.aten.sigmoid_backward(grad_g, g)  # ∂/∂(s·p), in s·p's dtype
        need_x, need_p, need_scale, need_loc, need_glob = ctx.needs_input_grad
        return (grad.to(ctx.x_dtype) if need_x else None,
                (grad_t * scale).to(p.dtype) if need_p else None,
                (grad_t * p).sum().to(scale.dtype) if need_scale else None,
                (grad_a * g).to(loc.dtype) if need_loc else None,
                (grad_b * rest).to(glob.dtype) if need_glob else None)


def gated_mix(x: torch.Tensor, p: torch.Tensor, scale: torch.Tensor, loc: torch.Tensor,
              glob: torch.Tensor) -> torch.Tensor:
    """x + g ⊙ loc + (1 − g) ⊙ glob, g = σ(scale · p): the block's mix of its two paths by the
    BK gate (p = P(|Im G|), `BKGate(…, logit=True)`), keeping p rather than g and 1 − g for
    backward (_GatedMix)."""
    return _GatedMix.apply(x, p, scale, loc, glob)


class Phase7Block(nn.Module):
    def __init__(self, config: Phase7Config):
        super().__init__()
        d = config.d_model
        self.ln_mix = nn.LayerNorm(d)
        self.local = PoincareWindowAttention(
            d_model=d, n_heads=config.n_heads, head_dim=config.head_dim, window=config.window,
            curvature=config.curvature, beta_init=config.beta_init, rope_base=config.rope_base,
            recompute_dot=config.recompute_dot,
        )
        self.ssm = ARSSM(d_model=d, rank=config.ar_ssm_rank,
                         decay_init=tuple(config.ar_ssm_decay_init))
        self.gate = BKGate(d_model=d, channels=config.bk_channels, backend=config.backend,
                           z_imag_init=config.bk_z_imag_init)
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = make_ffn(config.ffn, d_model=d, d_ff=config.d_ff,
                            n_experts=config.moe_experts, top_k=config.moe_top_k)

    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        where = dict(device=device, dtype=dtype)
        return {"local": self.local.init_state(batch, **where),
                "ssm": self.ssm.init_state(batch, **where),
                "bk": self.gate.init_carry(batch, **where)}

    def forward(self, x: torch.Tensor, state: dict | None = None):
        h = self.ln_mix(x)
        if state is None:
            x = gated_mix(x, self.gate(h, logit=True), self.gate.scale, self.local(h),
                          self.ssm(h))
            return x + self.ffn(self.ln_ffn(x))
        g, bk = self.gate(h, state["bk"])
        loc, local = self.local(h, state["local"])
        glob, ssm = self.ssm(h, state["ssm"])
        x = x + g * loc + (1 - g) * glob
        return x + self.ffn(self.ln_ffn(x)), {"local": local, "ssm": ssm, "bk": bk}


class Phase7LM(StreamingLM):
    """`embed` gives h₀ and `blocks` the layers: the names the gradient-flow probe relies on."""

    def __init__(self, config: Phase7Config):
        super().__init__()
        self.config = config
        self.embed = token_embedding(config.embedding, config.vocab_size, config.d_model,
                                     htt_rank=config.htt_rank)
        self.blocks = nn.ModuleList(Phase7Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        if config.head == "dense":
            # GPT-2's table scale, N(0, 0.02): the untied head the quality findings call for
            self.head = nn.Parameter(torch.randn(config.vocab_size, config.d_model) * 0.02)
        if config.init == "gpt2":
            gpt2_init(self.blocks, config.n_layers)

    def output_table(self) -> torch.Tensor:
        return self.head if self.config.head == "dense" else embedding_table(self.embed)


PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, head_dim=32, d_ff=256, window=16,
                 ar_ssm_rank=8, bk_channels=4, htt_rank=4),
    # a dense tied table: HTT's factorised one costs perplexity it does not save at this size
    # (reports/quality: cpu-screen-6 for Phase 7, gpu-screen-4 for Phase 1)
    "small": dict(d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=1024,
                  embedding="dense", head="tied"),
    "base": dict(d_model=512, n_layers=6, n_heads=8, head_dim=64, d_ff=2048,
                 embedding="dense", head="tied"),
    "1.5b": dict(d_model=2048, n_layers=24, n_heads=16, head_dim=128, d_ff=8192, window=128,
                 htt_rank=32, ar_ssm_rank=64, bk_channels=32, checkpointing=True),
}


def _matched_transformer(preset: str, vocab_size: int) -> str:
    # the dense head is V·D like the transformer's tied table, so one preset serves every
    # vocabulary (tests/models/test_phase7.py checks 50257 and 8192)
    return "phase7-1.5b" if preset == "1.5b" else preset


register(Family("phase7", Phase7Config, Phase7LM, PRESETS, "small", _matched_transformer))
