"""Phase 3 Stage 1 — complex dynamics (DESIGN §3.4).

Every activation is complex, stored planar (layers.complex): d_model real numbers a token,
d_model/2 complex channels, so the residual stream holds as many numbers as a transformer's of
the same d_model and, in bf16, half the bytes of complex64.

The all-complex block of the design (the `-complex` presets): z → complex LN → causal complex
diagonal recurrence h_t = λ ⊙ h_{t−1} + γ ⊙ B z_t, λ = exp(−softplus(ν) + iω) per state channel
(d_state of them, chunked scan, ops.complex_scan) → ComplexLinear(d_state → D) → ModReLU → +;
then z → complex LN → ComplexLinear(D → d_ff) → ModReLU → ComplexLinear(d_ff → D) → +.
The default block keeps that recurrence and adds what the en-prose gate rewarded
(reports/quality): the read-out × SiLU(W LN z) (`gate`), |λ_t| chosen by the input through a
rank-16 map (`selective_rank`), a 64-token softmax window sublayer (`local_window`) and a real
GELU FFN on the planar stream (`real_ffn`). Output: complex LN, real part, → Linear(D → V) tied
to the real embedding table. ComplexEmbedding: two tables.

A complex linear map holds half the real parameters of a real one of the same real width, so
the state and the complex FFN are wider than a transformer's (d_state = 2·d_model, d_ff =
4·d_model complex channels): the all-complex block holds 12·d_model² as a transformer block
does; the default block cuts d_ff to pay for the window.

Streaming: `init_state(B)` and `forward(ids, state)` carry each block's h (planar, (B,
2·d_state)) and the window's keys and values across segments, exactly.

Kept for backward (scripts/saved_activations.py counts it): the gate and the recurrence's two
projections read one autocast copy of LN z (layers.cast); each complex LN keeps its input and
per-token statistics, and the read-out's ModReLU × SiLU(W LN z) keeps its input and the gate's
logit (one autograd node each, layers.complex).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.layers.cast import autocast_read
from muse.layers.complex import (
    ComplexDiagonalRecurrence,
    ComplexEmbedding,
    ComplexLayerNorm,
    ComplexLinear,
    ModReLU,
    RealPart,
    complex_layer_norm_reference,
    complex_linear_reference,
    modrelu_reference,
)
from muse.layers.local_attention import SlidingWindowAttention
from muse.layers.mlp import MLP
from muse.models.common import INITS, StreamingLM
from muse.models.config import StrictConfig
from muse.models.registry import Family, register
from muse.ops.complex_scan import complex_decayed_cumsum, complex_recurrence_naive


@dataclass
class Phase3Config(StrictConfig):
    vocab_size: int = 50257
    d_model: int = 256  # real numbers a token: d_model/2 complex channels (even)
    n_layers: int = 4
    d_state: int = 512  # complex channels of the recurrence
    d_ff: int = 768  # FFN width (complex channels, or reals with real_ffn); 0: no FFN sublayer
    chunk: int = 64  # tokens per chunk of the scan
    # −log|λ| at init, log-uniform over the state channels (memories of ~1/rate tokens): the
    # slowest ~10⁵ tokens, so a gradient from 65k tokens back survives
    decay_range: tuple[float, float] = (1e-5, 0.1)
    max_phase: float = math.pi / 10  # ω at init, uniform in [0, max_phase]
    init: str = "gpt2"  # "torch" (complex Glorot) or "gpt2": N(0, 0.02²), residual out / √(2L)
    checkpointing: bool = False
    # the recurrence's read-out × SiLU(W LN z), a real gain per complex channel (phase kept)
    gate: bool = True
    # w > 0: sliding-window softmax attention over the planar stream (d_model reals a token),
    # local_heads × local_head_dim wide: exact recall inside w tokens, which an LTI state lacks
    local_window: int = 64
    local_heads: int = 2
    local_head_dim: int = 64
    # the FFN a real GELU MLP on the planar stream (LayerNorm → D → d_ff → D), the same real
    # parameters as the complex FFN: what a ModReLU FFN costs the model
    real_ffn: bool = True
    # r > 0: |λ| chosen per token by the input through a rank-r map (layers.complex), the
    # time-invariant recurrence at init
    selective_rank: int = 16

    def __post_init__(self) -> None:
        self.require_positive_ints("vocab_size", "d_model", "n_layers", "d_state", "chunk",
                                   "local_heads", "local_head_dim")
        self.require_nonnegative_ints("local_window", "d_ff", "selective_rank")
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (d_model/2 complex channels), "
                             f"got {self.d_model!r}")
        if self.chunk < 2:
            raise ValueError(f"chunk must be ≥ 2, got {self.chunk!r}")
        if not isinstance(self.real_ffn, bool):
            raise ValueError(f"real_ffn must be true or false, got {self.real_ffn!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        low, high = self.decay_range
        if not 0 < low <= high:
            raise ValueError(f"decay_range must be (low, high) with 0 < low ≤ high, "
                             f"got {self.decay_range!r}")
        if not self.max_phase >= 0:
            raise ValueError(f"max_phase must be ≥ 0, got {self.max_phase!r}")


class Phase3Block(nn.Module):
    def __init__(self, config: Phase3Config):
        super().__init__()
        d = config.d_model // 2
        self.ln_rec = ComplexLayerNorm(d)
        self.rec = ComplexDiagonalRecurrence(d, config.d_state, chunk=config.chunk,
                                             decay_range=tuple(config.decay_range),
                                             max_phase=config.max_phase,
                                             selective_rank=config.selective_rank)
        self.rec_out = ComplexLinear(config.d_state, d)
        self.act_rec = ModReLU(d)
        self.gate = nn.Linear(config.d_model, d) if config.gate else None
        window = config.local_window
        self.ln_local = ComplexLayerNorm(d) if window else None
        self.local = (
            SlidingWindowAttention(d_model=config.d_model, n_heads=config.local_heads,
                                   head_dim=config.local_head_dim, window=window)
            if window
            else None
        )
        self.ln_ffn = self.up = self.act_ffn = self.down = self.ffn = None
        if config.d_ff and config.real_ffn:
            self.ln_ffn = nn.LayerNorm(config.d_model)
            self.ffn = MLP(d_model=config.d_model, d_ff=config.d_ff)
        elif config.d_ff:
            self.ln_ffn = ComplexLayerNorm(d)
            self.up = ComplexLinear(d, config.d_ff)
            self.act_ffn = ModReLU(config.d_ff)
            self.down = ComplexLinear(config.d_ff, d)

    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        ref = self.rec.nu
        state = {"h": torch.zeros(batch, 2 * self.rec.d_state, device=device or ref.device,
                                  dtype=dtype or ref.dtype)}
        if self.local is not None:
            state["local"] = self.local.init_state(batch, device=device, dtype=dtype)
        return state

    def forward(self, x: torch.Tensor, state: dict | None = None):
        z = self.ln_rec(x)
        if state is None:
            h = self.rec(z)
        else:
            h, last = self.rec(z, state["h"])
            new = {"h": last}
        # the gate reads the autocast copy of z the recurrence's projections read (layers.cast)
        # and enters ModReLU's node: SiLU(W z) per channel, keeping W z only
        gate = None if self.gate is None else self.gate(autocast_read(z))
        x = x + self.act_rec(self.rec_out(h), gate)
        if self.local is not None:
            if state is None:
                x = x + self.local(self.ln_local(x))
            else:
                y, new["local"] = self.local(self.ln_local(x), state["local"])
                x = x + y
        if self.up is not None:
            x = x + self.down(self.act_ffn(self.up(self.ln_ffn(x))))
        if self.ffn is not None:
            x = x + self.ffn(self.ln_ffn(x))
        return x if state is None else (x, new)


def _planar(z: torch.Tensor) -> torch.Tensor:
    return torch.cat((z.real, z.imag), dim=-1)


def block_reference(block: Phase3Block, z: torch.Tensor) -> torch.Tensor:
    """The same block on torch complex tensors (complex64 or complex128), from its weights: the
    oracle of the planar block in the tests, and the complex64 side of the memory comparison."""
    normed = complex_layer_norm_reference(z, block.ln_rec)
    log_mag, angle = block.rec.log_decay(_planar(normed))
    gain = torch.sqrt(-torch.expm1(2 * log_mag)).to(z.dtype)
    u = complex_linear_reference(normed, block.rec.proj_in)
    if log_mag.dim() == 1:
        h = complex_decayed_cumsum(u * gain, log_mag, angle, block.rec.chunk)
    else:  # the per-token definition of the selective recurrence
        h = complex_recurrence_naive(u * gain, torch.exp(torch.complex(log_mag, angle)).to(z.dtype))
    y = modrelu_reference(complex_linear_reference(h, block.rec_out), block.act_rec)
    if block.gate is not None:
        y = y * F.silu(block.gate(_planar(normed)))
    z = z + y
    if block.local is not None:
        read = block.local(_planar(complex_layer_norm_reference(z, block.ln_local)))
        z = z + torch.complex(*read.chunk(2, dim=-1))
    if block.up is not None:
        up = complex_linear_reference(complex_layer_norm_reference(z, block.ln_ffn), block.up)
        z = z + complex_linear_reference(modrelu_reference(up, block.act_ffn), block.down)
    if block.ffn is not None:
        z = z + torch.complex(*block.ffn(block.ln_ffn(_planar(z))).chunk(2, dim=-1))
    return z


class Phase3LM(StreamingLM):
    """`embed` gives h₀ (planar, (B, N, d_model)) and `blocks` the layers: the names the
    gradient-flow probe relies on. The head reads the real plane, tied to the real table."""

    def __init__(self, config: Phase3Config):
        super().__init__()
        self.config = config
        d = config.d_model // 2
        self.embed = ComplexEmbedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(Phase3Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.Sequential(ComplexLayerNorm(d), RealPart())
        if config.init == "gpt2":
            # the transformer's N(0, 0.02) on each complex weight (0.02/√2 a plane), and
            # 1/√(2L) of it on the maps that write into the residual stream
            std = 0.02 / math.sqrt(2)
            for block in self.blocks:
                for layer in (block.rec.proj_in, block.up):
                    if layer is not None:
                        layer.reset_parameters(std)
                for layer in (block.rec_out, block.down):
                    if layer is not None:
                        layer.reset_parameters(std / math.sqrt(2 * config.n_layers))
                # the real layers as the transformer's: N(0, 0.02), the residual write scaled
                if block.gate is not None:
                    nn.init.normal_(block.gate.weight, std=0.02)
                    nn.init.zeros_(block.gate.bias)
                if block.ffn is not None:
                    nn.init.normal_(block.ffn.up.weight, std=0.02)
                    nn.init.normal_(block.ffn.down.weight,
                                    std=0.02 / math.sqrt(2 * config.n_layers))
                    nn.init.zeros_(block.ffn.up.bias)
                    nn.init.zeros_(block.ffn.down.bias)
                if block.local is not None:
                    nn.init.normal_(block.local.qkv.weight, std=0.02)
                    nn.init.normal_(block.local.out.weight,
                                    std=0.02 / math.sqrt(2 * config.n_layers))

    def output_table(self) -> torch.Tensor:
        return self.embed.real.weight


def saved_activation_bytes(fn, *params: nn.Parameter) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn()` runs, leaving out
    `params` themselves: a block's activation memory, counted on any device."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def block_memory(d_model: int = 512, seq: int = 1024, batch: int = 1, seed: int = 0,
                 planar_dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Saved-for-backward bytes of one phase3 block (the `base` widths by default) on one
    batch: planar in `planar_dtype` against the same block on complex64 tensors."""
    torch.manual_seed(seed)
    config = Phase3Config(d_model=d_model, d_state=2 * d_model, d_ff=4 * d_model, **_COMPLEX)
    block = Phase3Block(config)
    z = torch.randn(batch, seq, d_model // 2, dtype=torch.complex64)
    planar_block = Phase3Block(config).to(planar_dtype)
    planar_block.load_state_dict(block.state_dict())
    x = torch.cat((z.real, z.imag), dim=-1).to(planar_dtype).requires_grad_()
    zc = z.clone().requires_grad_()
    planar = saved_activation_bytes(lambda: planar_block(x), *planar_block.parameters())
    native = saved_activation_bytes(lambda: block_reference(block, zc), *block.parameters())
    return {"planar_bytes": planar, "complex64_bytes": native,
            "input_bytes_planar": x.numel() * x.element_size(),
            "input_bytes_complex64": zc.numel() * zc.element_size()}


# The default block (gated read-out, GELU FFN, input-chosen |λ|, a 64-token window) at the
# transformer's shapes: d_ff pays for the window, within 5% of the transformer preset of the same
# name (tests/models/test_matched.py). "-complex" is the all-complex block of DESIGN §3.4 (ModReLU
# FFN, time-invariant λ with memories of ≤ 10³ tokens, no window), "-gated" that block with the
# gated read-out: the blocks the earlier gates judged (reports/README.md).
_COMPLEX = dict(gate=False, real_ffn=False, selective_rank=0, local_window=0,
                decay_range=(1e-3, 0.1))
PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, d_state=128, d_ff=192, local_head_dim=16),
    "small": dict(d_model=256, n_layers=4, d_state=512, d_ff=768),
    "base": dict(d_model=512, n_layers=6, d_state=1024, d_ff=1792),
}
for _name, _full in (("tiny", 256), ("small", 1024), ("base", 2048)):
    PRESETS[f"{_name}-complex"] = {**PRESETS[_name], **_COMPLEX, "d_ff": _full}
PRESETS["small-gated"] = {**PRESETS["small-complex"], "gate": True}


def _same_preset(preset: str, vocab_size: int) -> str:
    return preset.split("-")[0]


register(Family("phase3", Phase3Config, Phase3LM, PRESETS, "small", _same_preset))
