"""Phase 2 — Breath of Life (DESIGN §3.3), the core of it.

Block: x → LN → non-Hermitian BK (V − iΓ in the resolvent) → +; → LN → dissipative Hebbian fast
weights (decay e^{−Γ_t dt}, gradient through time) → +; → LN → FFN → +. Dense embedding tied
to the head.

Streaming: `init_state(B)` and `forward(ids, state)` carry each block's BK boundary value and
Hebbian W across segments, exactly (two segments give the logits of one run over both). Two
optional filters act on the carried W between segments (layers.state_filters): the SNR filter
(`snr_filter`) sets the next segment's extra forgetting and write strength per head from
mean|W|/std(W), and memory resonance (`resonance`) projects W onto a zeta-zero plane-wave basis
and drops its weak modes. `zeta_init` starts the token embedding as sinusoids at zeta-zero
frequencies (layers.zeta).

The default block reads out like the published gated linear-attention models (layers.hebbian):
a short causal conv on q, k, v, unit queries and keys, Mamba2-style data-dependent decay, a
per-head output norm and gate, and the gated delta rule; GPT-2 init; the BK sublayer with 8
channels and its output projection at zero, so it starts as a no-op and grows in as it helps
(reports/quality ranks these choices). Each can be turned off; `bk_mixer=False` drops the BK
sublayer to measure what it adds.

Kept for backward (scripts/saved_activations.py counts it): the Hebbian projections of LN x read
one autocast copy of it (layers.cast); the short conv + SiLU, the output gate (RMS norm · gain ·
SiLU) and, in the delta rule, A, β·v, the scores, the tail products and the chunk-to-chunk states
are one autograd node each keeping their inputs (v in bf16); the delta rule and the plain heads
take q, k laid out once (no per-product copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from muse.layers.bk import NonHermitianBKMixer
from muse.layers.embedding import dense_embedding
from muse.layers.hebbian import BACKENDS as HEBBIAN_BACKENDS
from muse.layers.hebbian import STATES as HEBBIAN_STATES
from muse.layers.hebbian import DissipativeHebbian, decay_diagnostics
from muse.layers.moe import make_ffn
from muse.layers.state_filters import Resonance, check_snr_config, snr_adjustments
from muse.models.common import INITS, StreamingLM, gpt2_init
from muse.models.config import FFNConfig
from muse.models.registry import Family, register


@dataclass
class Phase2Config(FFNConfig):
    vocab_size: int = 50257
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4  # Hebbian heads
    head_dim: int = 64
    d_ff: int = 1024
    bk_channels: int = 8
    gamma_base: float = 1e-3  # Γ_base of the non-Hermitian potential
    # pre-softplus Im z spread over the channels: Im z from 0.13 (far) to 1.3 (local), BKMixer
    bk_z_imag_init: float | tuple[float, float] = (-2.0, 1.0)  # a float: one value for all
    hebbian_eta: float = 1.0
    hebbian_dt: float = 1.0
    hebbian_chunk: int = 64
    # pre-softplus Γ bias spread over the heads at init: Γ from 1e-4 to 5e-2 per step
    hebbian_gamma_init: tuple[float, float] = (-9.0, -3.0)
    hebbian_out_norm: bool = True  # each head's read-out divided by its RMS (layers.norm)
    hebbian_backend: str = "auto"  # "auto" = "torch" (chunked + Triton scan), or "fla"
    # the read-out of gated linear-attention models (layers.hebbian, QUALITY.md items 1–4, 7)
    hebbian_conv: int = 4  # short causal conv + SiLU on q, k, v: kernel size, 0 = none
    hebbian_qk_norm: str = "l2"  # "k": unit keys; "l2": unit queries and keys
    hebbian_decay: str = "mamba2"  # "softplus" (Γ spread by gamma_init) or "mamba2"
    # mamba2: softplus(b) log-uniform over the heads at init (per-step rates; 1/rate tokens)
    hebbian_dt_range: tuple[float, float] = (1e-3, 0.1)
    hebbian_out_gate: bool = True  # per-head RMSNorm with a gain × SiLU(W_g x)
    hebbian_delta: bool = True  # erase before write: the gated delta rule (ops.delta_rule)
    # the first h heads (the slowest decays) write without erasing; the long-range gradient
    # needs such a path: the delta rule overwrites what it wrote within ~head_dim/β writes
    hebbian_plain_heads: int = 0
    # the delta rule's chunk products formed again in backward, not kept (less memory, one
    # more forward of that form)
    hebbian_recompute: bool = False
    # the delta rule's chunk-to-chunk walk: "auto" (Triton on CUDA where float32 matmuls may
    # use TF32: ops.delta_rule), "triton" or "torch"
    hebbian_states: str = "auto"
    local_window: int = 0  # w > 0: exact softmax attention over the last w tokens, mixed in
    bk_mixer: bool = True  # False: no BK sublayer (the ablation of what it adds)
    bk_zero_out: bool = True  # the BK sublayer's output projection starts at 0 (a no-op at init)
    init: str = "gpt2"  # "torch" (nn.Linear's own) or "gpt2": N(0, 0.02), residual out / √(2L)
    checkpointing: bool = False
    backend: str = "auto"  # BK-Core: "auto" (Triton on CUDA), "scan" or "triton"
    # the token embedding starts as sinusoids at zeta-zero frequencies (layers.zeta)
    zeta_init: bool = False
    # Streaming only, on the Hebbian W carried between segments (layers.state_filters):
    snr_filter: bool = False  # per head, SNR = mean|W|/std(W) below τ → forget faster, write less
    snr_threshold: float = 0.5  # τ (i.i.d. Gaussian entries give SNR ≈ 0.80)
    snr_gamma_scale: float = 0.01  # ΔΓ per step at SNR = 0
    snr_eta_scale: float = 0.5  # η × (1 − this) at SNR = 0
    resonance: bool = False  # project W onto a zeta-zero basis, drop its weak modes
    resonance_modes: int = 0  # basis size M ≤ head_dim; 0: M = head_dim
    resonance_threshold: float = 0.01  # keep modes with energy ≥ this × the strongest mode's

    def __post_init__(self) -> None:
        super().__post_init__()
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
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.hebbian_states not in HEBBIAN_STATES:
            raise ValueError(f"hebbian_states must be one of {HEBBIAN_STATES}, got "
                             f"{self.hebbian_states!r}")
        self.require_nonnegative_ints("hebbian_conv", "local_window", "hebbian_plain_heads")
        # without the delta rule every head is plain already (the presets keep one plain head)
        if self.hebbian_delta and self.hebbian_plain_heads >= self.n_heads:
            raise ValueError(f"hebbian_plain_heads must be < n_heads = {self.n_heads} with "
                             f"hebbian_delta=true, got {self.hebbian_plain_heads}")
        self.reject_unused("bk_mixer", "bk_zero_out", "bk_channels", "bk_z_imag_init")
        if not self.gamma_base > 0:
            raise ValueError(f"gamma_base must be > 0, got {self.gamma_base!r}")
        self.reject_unused("snr_filter", "snr_threshold", "snr_gamma_scale", "snr_eta_scale")
        self.reject_unused("resonance", "resonance_modes", "resonance_threshold")
        if self.snr_filter:
            check_snr_config(self.snr_threshold, self.snr_gamma_scale, self.snr_eta_scale)
        modes = self.resonance_modes
        if not isinstance(modes, int) or isinstance(modes, bool) or not 0 <= modes <= self.head_dim:
            raise ValueError(
                f"resonance_modes must be an integer in [0, head_dim={self.head_dim}] "
                f"(0: head_dim), got {modes!r}"
            )
        if not 0 < self.resonance_threshold <= 1:
            raise ValueError(
                f"resonance_threshold must be in (0, 1], got {self.resonance_threshold!r}"
            )


class Phase2Block(nn.Module):
    def __init__(self, config: Phase2Config):
        super().__init__()
        d = config.d_model
        if config.bk_mixer:
            self.ln_bk = nn.LayerNorm(d)
            self.bk = NonHermitianBKMixer(
                d_model=d,
                channels=config.bk_channels,
                gamma_base=config.gamma_base,
                backend=config.backend,
                z_imag_init=config.bk_z_imag_init,
            )
        else:
            self.ln_bk = self.bk = None
        self.ln_hebb = nn.LayerNorm(d)
        self.hebbian = DissipativeHebbian(
            d_model=d,
            n_heads=config.n_heads,
            head_dim=config.head_dim,
            eta=config.hebbian_eta,
            dt=config.hebbian_dt,
            chunk=config.hebbian_chunk,
            backend=config.hebbian_backend,
            out_norm=config.hebbian_out_norm,
            gamma_init=tuple(config.hebbian_gamma_init),
            conv=config.hebbian_conv,
            qk_norm=config.hebbian_qk_norm,
            decay=config.hebbian_decay,
            out_gate=config.hebbian_out_gate,
            local_window=config.local_window,
            delta=config.hebbian_delta,
            dt_range=tuple(config.hebbian_dt_range),
            plain_heads=config.hebbian_plain_heads,
            recompute=config.hebbian_recompute,
            states=config.hebbian_states,
        )
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = make_ffn(
            config.ffn,
            d_model=d,
            d_ff=config.d_ff,
            n_experts=config.moe_experts,
            top_k=config.moe_top_k,
        )
        self.resonance = (
            Resonance(
                head_dim=config.head_dim,
                modes=config.resonance_modes or config.head_dim,
                threshold=config.resonance_threshold,
            )
            if config.resonance
            else None
        )
        self.snr = (
            (config.snr_threshold, config.snr_gamma_scale, config.snr_eta_scale)
            if config.snr_filter
            else None
        )

    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        """Zero boundary value and W; with the SNR filter, no adjustment (ΔΓ = 0, η × 1)."""
        ref = self.ln_hebb.weight
        device = device or ref.device
        # W accumulates in float32 at least (both Hebbian backends keep it there)
        wide = torch.promote_types(dtype or ref.dtype, torch.float32)
        heads, dh = self.hebbian.n_heads, self.hebbian.head_dim
        state = {"hebbian": torch.zeros(batch, heads, dh, dh, device=device, dtype=wide)}
        if self.bk is not None:
            state["bk"] = self.bk.init_carry(batch, device=device, dtype=dtype)
        tails = self.hebbian.init_tails(batch, device=device, dtype=dtype)
        if tails:
            state["tails"] = tails
        if self.snr is not None:
            state["gamma_offset"] = torch.zeros(batch, heads, device=device, dtype=wide)
            state["eta_scale"] = torch.ones(batch, heads, device=device, dtype=wide)
        return state

    def forward(self, x: torch.Tensor, state: dict | None = None):
        """x → x; with `state` (this block's part of a StreamState), (x, its next state): the
        Hebbian W after the last token, resonance-filtered if on, and the SNR filter's
        adjustments for the next segment if on."""
        if state is None:
            if self.bk is not None:
                x = x + self.bk(self.ln_bk(x))
            x = x + self.hebbian(self.ln_hebb(x))
            return x + self.ffn(self.ln_ffn(x))
        new = {}
        if self.bk is not None:
            h, new["bk"] = self.bk(self.ln_bk(x), state["bk"])
            x = x + h
        out = self.hebbian(
            self.ln_hebb(x),
            state["hebbian"],
            return_state=True,
            gamma_offset=state.get("gamma_offset"),
            eta_scale=state.get("eta_scale"),
            tails=state.get("tails"),
        )
        x = x + out[0]
        w = out[1]
        if len(out) == 3:
            new["tails"] = out[2]
        x = x + self.ffn(self.ln_ffn(x))
        if self.resonance is not None:
            w = self.resonance(w)
        new["hebbian"] = w
        if self.snr is not None:
            new["gamma_offset"], new["eta_scale"] = snr_adjustments(w, *self.snr)
        return x, new


class Phase2LM(StreamingLM):
    """`embed` gives h₀ and `blocks` the layers: the names the gradient-flow probe relies on."""

    def __init__(self, config: Phase2Config):
        super().__init__()
        self.config = config
        self.embed = dense_embedding(config.vocab_size, config.d_model, config.zeta_init)
        self.blocks = nn.ModuleList(Phase2Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        if config.init == "gpt2":
            gpt2_init(self.blocks, config.n_layers)
        if config.bk_mixer and config.bk_zero_out:
            for block in self.blocks:
                block.bk.zero_out()

    def diagnostics(self) -> dict[str, float]:
        """The MoE expert load (with MoE) and the Hebbian heads' decay of the last forward."""
        return {**super().diagnostics(), **decay_diagnostics(self)}



# The slowest head writes without erasing and the decays start with memories of up to 10^5
# tokens: with every head on the delta rule the gradient from 65k tokens back is ~0. "-delta":
# every head on the delta rule, decays from 10^3 tokens (the block the earlier gates judged).
_LONG_RANGE = dict(hebbian_plain_heads=1, hebbian_dt_range=(1e-5, 0.1))
PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, head_dim=32, d_ff=256, bk_channels=8),
    "small": dict(d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=1024),
    "base": dict(d_model=512, n_layers=6, n_heads=8, head_dim=64, d_ff=2048),
    "large": dict(d_model=1024, n_layers=12, n_heads=16, head_dim=64, d_ff=4096),
}
for _name in list(PRESETS):
    PRESETS[f"{_name}-delta"] = dict(PRESETS[_name])
    PRESETS[_name].update(_LONG_RANGE)


def _same_size_transformer(preset: str, vocab_size: int) -> str:
    # the transformer presets of the same name are within 2% in parameters (tests/models)
    return preset.removesuffix("-delta")


register(Family("phase2", Phase2Config, Phase2LM, PRESETS, "small", _same_size_transformer))
