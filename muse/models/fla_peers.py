"""Peer O(N) models built from flash-linear-attention's layers: `fla-retnet`, `fla-gla`,
`fla-deltanet` and `fla-gated-deltanet`, the anchors a new O(N) model is compared with.

Each is fla's own token mixer (MultiScaleRetention, GatedLinearAttention, DeltaNet,
GatedDeltaNet) at fla's default widths and the transformer's heads, in the transformer
baseline's shell: token embedding, pre-LN blocks x + mixer(LN x), x + MLP(LN x), final LN,
tied head, GPT-2 init. The GELU MLP's width takes what the mixer leaves of the matched
transformer block's parameters, so each preset is within a few percent of the transformer
preset of the same name at any vocabulary.

fla is optional (`pip install -e ".[fla]"`) and its kernels are Triton, CUDA only: registering
the families imports nothing from fla; building a model does, and running one needs CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from muse.layers import count_params
from muse.layers.head import chunked_next_token_loss, tied_logits
from muse.layers.mlp import MLP
from muse.models.common import check_input_ids, run_blocks
from muse.models.config import StrictConfig
from muse.models.registry import Family, register
from muse.models.transformer import PRESETS as TRANSFORMER_PRESETS

INSTALL = 'pip install -e ".[fla]"'

# kind → (fla layer, fla's default key and value widths as multiples of d_model, MLP width as a
# multiple of d_model). Gated DeltaNet's keys are 1·D here, 64 wide a head as the transformer's
# (fla's 2048-wide default: 6 heads of 256, 0.75·D). A mixer of widths (k, v) holds about
# (2k + 3v)·D² weights (q, k; v, output gate, output), (2k + 2v)·D² without the gate
# (DeltaNet); attention holds 4·D², so a mixer of 8·D² leaves the MLP 4·D² (d_ff = 2·D) of the
# transformer block's 12·D².
KINDS = {
    "retnet": ("MultiScaleRetention", 1.0, 2.0, 2),
    "gla": ("GatedLinearAttention", 0.5, 1.0, 4),
    "deltanet": ("DeltaNet", 1.0, 1.0, 4),
    "gated-deltanet": ("GatedDeltaNet", 1.0, 2.0, 2),
}

# Kinds whose backward runs fla's gated `chunk_bwd_dqkwg` (fla/ops/common/chunk_o.py), which fla
# refuses with a RuntimeError on Hopper with 3.4.0 ≤ Triton < 3.7.1 (a Triton miscompile, fla
# issue #640) unless tilelang is installed. RetNet's decay is fixed (g_gamma, no gate tensor),
# DeltaNet has no gate, and GLA's chunk backward is its own kernel (fla 0.6.0).
REFUSED_ON_HOPPER = ("gated-deltanet",)
TRITON_FIXED = (3, 7, 1)
TRITON_BROKEN_FROM = (3, 4, 0)


class FlaUnavailable(ValueError):
    """An fla peer cannot be built or run here: fla missing, no CUDA, or a kernel fla refuses."""


@dataclass
class FlaPeerConfig(StrictConfig):
    kind: str = "retnet"  # one of KINDS; each registered family fixes its own
    vocab_size: int = 50257
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    expand_k: float = 1.0  # query/key width = expand_k · d_model, split over the heads
    expand_v: float = 2.0  # value width = expand_v · d_model, split over the heads
    d_ff: int = 512
    checkpointing: bool = False  # recompute each block in backward to save activation memory

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {tuple(KINDS)}, got {self.kind!r}")
        self.require_positive_ints("vocab_size", "d_model", "n_layers", "n_heads", "d_ff")
        for key in ("expand_k", "expand_v"):
            width = getattr(self, key) * self.d_model
            if not (width > 0 and width == round(width) and round(width) % self.n_heads == 0):
                raise ValueError(
                    f"{key} · d_model = {getattr(self, key)!r} · {self.d_model} must be a positive "
                    f"integer divisible by n_heads ({self.n_heads})"
                )
        ratio = self.expand_v / self.expand_k
        if self.kind == "gated-deltanet" and ratio != round(ratio):
            raise ValueError(
                "gated-deltanet sets its value width per key head: expand_v must be a multiple "
                f"of expand_k, got expand_k={self.expand_k!r}, expand_v={self.expand_v!r}"
            )


def fla_layers():
    """fla.layers, imported on first use; FlaUnavailable saying what to install if it fails."""
    try:
        import fla.layers
    except ImportError as exc:
        raise FlaUnavailable(
            f"the fla peers need flash-linear-attention, which cannot be imported here ({exc}): "
            f"{INSTALL}"
        ) from exc
    return fla.layers


def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def make_mixer(layers, config: FlaPeerConfig, layer_idx: int) -> nn.Module:
    d, h = config.d_model, config.n_heads
    key_dim = round(config.expand_k * d)
    if config.kind == "gated-deltanet":
        return layers.GatedDeltaNet(hidden_size=d, num_heads=h, head_dim=key_dim // h,
                                    expand_v=config.expand_v / config.expand_k,
                                    layer_idx=layer_idx)
    cls = getattr(layers, KINDS[config.kind][0])
    return cls(hidden_size=d, num_heads=h, expand_k=config.expand_k, expand_v=config.expand_v,
               layer_idx=layer_idx)


def _version(text: str) -> tuple[int, int, int]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(int(part or 0) for part in match.groups())


def hopper_refusal(kind: str, capability: tuple[int, int], triton_version: str,
                   tilelang: bool = False) -> str | None:
    """Why fla would refuse this kind's backward on a GPU of this capability with this Triton,
    or None when it runs (fla's own condition, checked before a step rather than inside it)."""
    if kind not in REFUSED_ON_HOPPER or capability[0] != 9 or tilelang:
        return None
    if not TRITON_BROKEN_FROM <= _version(triton_version) < TRITON_FIXED:
        return None
    return (
        f"fla-{kind}: fla refuses the backward of its gated chunk kernel (chunk_bwd_dqkwg) on "
        f"Hopper (CUDA capability {capability[0]}.{capability[1]}) with Triton {triton_version}: "
        "Triton ≥ 3.4.0 and < 3.7.1 miscompiles it there (fla issue #640). Upgrade Triton to "
        "≥ 3.7.1 or `pip install tilelang`; forward passes under torch.no_grad() still run, and "
        "fla-retnet, fla-gla and fla-deltanet train here"
    )


def _triton_version() -> str:
    import triton

    return triton.__version__


def _tilelang_installed() -> bool:
    return importlib.util.find_spec("tilelang") is not None


@functools.cache
def _hopper_refusal_on(kind: str, device: torch.device) -> str | None:
    capability = torch.cuda.get_device_capability(device)
    return hopper_refusal(kind, capability, _triton_version(), _tilelang_installed())


def check_runs_here(kind: str, device: torch.device, backward: bool) -> None:
    """FlaUnavailable unless fla's kernels for this kind run (and, for `backward`, train) on
    `device`: never a fall-back to another kernel."""
    if device.type != "cuda":
        raise FlaUnavailable(
            f"fla-{kind} runs fla's Triton kernels, which need a CUDA device; the input is on "
            f"{device}"
        )
    if backward:
        reason = _hopper_refusal_on(kind, torch.device("cuda", torch.cuda.current_device())
                                    if device.index is None else device)
        if reason:
            raise FlaUnavailable(reason)


class PeerBlock(nn.Module):
    def __init__(self, config: FlaPeerConfig, mixer: nn.Module):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.mixer = mixer
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(d_model=config.d_model, d_ff=config.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.ln1(x))[0]  # fla layers return (output, attentions, cache)
        return x + self.mlp(self.ln2(x))


class FlaPeerLM(nn.Module):
    """`embed` gives h₀ and `blocks` the layers: the names the gradient-flow probe relies on."""

    def __init__(self, config: FlaPeerConfig):
        super().__init__()
        layers = fla_layers()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            PeerBlock(config, make_mixer(layers, config, i)) for i in range(config.n_layers)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        # The transformer baseline's init (and fla's own models'): N(0, 0.02) on every linear,
        # convolution and embedding weight, zero biases, 0.02/√(2L) on the residual projections.
        # Decay parameters (Gated DeltaNet's A_log, dt_bias) and norms keep fla's init.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.mixer.o_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=std)

    def num_params(self) -> int:
        return count_params(self)

    def forward(self, input_ids: torch.Tensor, *, loss_chunk: int | None = None) -> torch.Tensor:
        """logits (B, N, V), or with `loss_chunk` the chunked next-token loss (layers.head)."""
        check_input_ids(input_ids)
        check_runs_here(self.config.kind, input_ids.device, backward=torch.is_grad_enabled())
        x = self.ln_f(run_blocks(self.blocks, self.embed(input_ids), self.config.checkpointing))
        if loss_chunk is not None:
            return chunked_next_token_loss(x, self.embed.weight, input_ids, loss_chunk)
        return tied_logits(x, self.embed.weight)


def _same_preset(preset: str, vocab_size: int) -> str:
    return preset


def _builder(kind: str):
    def build(config: FlaPeerConfig) -> FlaPeerLM:
        if config.kind != kind:
            raise ValueError(
                f"model fla-{kind} builds kind {kind!r}, got kind={config.kind!r}: "
                f"use the model fla-{config.kind}"
            )
        return FlaPeerLM(config)

    return build


def presets(kind: str) -> dict[str, dict]:
    """The transformer's tiny, small and base shapes with this kind's mixer and MLP widths."""
    _, expand_k, expand_v, ff_mult = KINDS[kind]
    out = {}
    for name in ("tiny", "small", "base"):
        shape = TRANSFORMER_PRESETS[name]
        d = shape["d_model"]
        out[name] = dict(kind=kind, d_model=d, n_layers=shape["n_layers"],
                         n_heads=shape["n_heads"], expand_k=expand_k, expand_v=expand_v,
                         d_ff=ff_mult * d)
    return out


FLA_CUDA_ONLY = f"fla's kernels are Triton, CUDA only ({INSTALL})"

for _kind in KINDS:
    register(Family(f"fla-{_kind}", FlaPeerConfig, _builder(_kind), presets(_kind), "small",
                    _same_preset, cuda_only=FLA_CUDA_ONLY, extra="fla"))
