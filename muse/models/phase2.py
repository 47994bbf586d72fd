"""Phase 2 — Breath of Life (DESIGN §3.3), the core of it.

Block: x → LN → non-Hermitian BK (V − iΓ in the resolvent) → +; → LN → dissipative Hebbian fast
weights (decay e^{−Γ_t dt}, gradient through time) → +; → LN → FFN → +. Dense embedding tied
to the head. Not yet here: streaming state across segments, the SNR filter and the zeta-zero
resonance on that state, and zeta initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from muse.layers.bk import NonHermitianBKMixer
from muse.layers.head import tied_logits
from muse.layers.hebbian import BACKENDS as HEBBIAN_BACKENDS
from muse.layers.hebbian import DissipativeHebbian
from muse.layers.moe import check_ffn_config, make_ffn, moe_aux_loss, moe_diagnostics
from muse.models.common import check_input_ids, run_blocks
from muse.models.config import StrictConfig
from muse.models.registry import Family, register


@dataclass
class Phase2Config(StrictConfig):
    vocab_size: int = 50257
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4  # Hebbian heads
    head_dim: int = 64
    d_ff: int = 1024
    ffn: str = "mlp"  # "mlp" or "moe" (top-k mixture of experts, see layers.moe)
    moe_experts: int = 8
    moe_top_k: int = 2  # ≥ 2: with one expert per token the router gets no gradient
    moe_aux_weight: float = 0.01  # × the load-balancing loss, added to the training loss
    bk_channels: int = 32
    gamma_base: float = 1e-3  # Γ_base of the non-Hermitian potential
    bk_z_imag_init: float = -3.0  # Im z ≈ 0.05 at init (see BKMixer)
    hebbian_eta: float = 1.0
    hebbian_dt: float = 1.0
    hebbian_chunk: int = 64
    hebbian_backend: str = "auto"  # "auto" (fla on CUDA), "fla" or "torch" (see layers.hebbian)
    checkpointing: bool = False
    backend: str = "auto"  # BK-Core: "auto" (Triton on CUDA), "scan" or "triton"

    def __post_init__(self) -> None:
        check_ffn_config(self.ffn, self.moe_experts, self.moe_top_k, self.moe_aux_weight)
        self.require_positive_ints(
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "head_dim",
            "d_ff",
            "bk_channels",
            "hebbian_chunk",
        )
        if self.hebbian_backend not in HEBBIAN_BACKENDS:
            raise ValueError(
                f"hebbian_backend must be one of {HEBBIAN_BACKENDS}, got {self.hebbian_backend!r}"
            )
        if not self.gamma_base > 0:
            raise ValueError(f"gamma_base must be > 0, got {self.gamma_base!r}")


class Phase2Block(nn.Module):
    def __init__(self, config: Phase2Config):
        super().__init__()
        d = config.d_model
        self.ln_bk = nn.LayerNorm(d)
        self.bk = NonHermitianBKMixer(
            d_model=d,
            channels=config.bk_channels,
            gamma_base=config.gamma_base,
            backend=config.backend,
            z_imag_init=config.bk_z_imag_init,
        )
        self.ln_hebb = nn.LayerNorm(d)
        self.hebbian = DissipativeHebbian(
            d_model=d,
            n_heads=config.n_heads,
            head_dim=config.head_dim,
            eta=config.hebbian_eta,
            dt=config.hebbian_dt,
            chunk=config.hebbian_chunk,
            backend=config.hebbian_backend,
        )
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = make_ffn(
            config.ffn,
            d_model=d,
            d_ff=config.d_ff,
            n_experts=config.moe_experts,
            top_k=config.moe_top_k,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.bk(self.ln_bk(x))
        x = x + self.hebbian(self.ln_hebb(x))
        return x + self.ffn(self.ln_ffn(x))


class Phase2LM(nn.Module):
    """`embed` gives h₀ and `blocks` the layers: the names the gradient-flow probe relies on."""

    def __init__(self, config: Phase2Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Phase2Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def aux_loss(self) -> torch.Tensor:
        """The MoE load-balancing losses of the last forward, summed (0 without MoE); the
        trainer adds `moe_aux_weight` times this to the language-model loss."""
        return moe_aux_loss(self)

    def diagnostics(self) -> dict[str, float]:
        """Per-step training diagnostics: the MoE expert load (empty without MoE)."""
        return moe_diagnostics(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_input_ids(input_ids)
        x = run_blocks(self.blocks, self.embed(input_ids), self.config.checkpointing)
        return tied_logits(self.ln_f(x), self.embed.weight)


PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, head_dim=32, d_ff=256, bk_channels=8),
    "small": dict(d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=1024),
    "base": dict(d_model=512, n_layers=6, n_heads=8, head_dim=64, d_ff=2048),
    "large": dict(d_model=1024, n_layers=12, n_heads=16, head_dim=64, d_ff=4096),
}


def _same_size_transformer(preset: str) -> str:
    # the transformer presets of the same name are within 2% in parameters (tests/models)
    return preset


register(Family("phase2", Phase2Config, Phase2LM, PRESETS, "small", _same_size_transformer))
