"""What a bench run measures: validated settings from the command line, and the cases
(model × preset × seq × dtype) the criteria are parametrized over, with stable readable ids
such as `transformer:small-seq4096-fp16` so `--benchmark-compare` matches runs across commits."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from muse.training.quality import QualitySettings

DEFAULT_SEQS = (1024, 2048, 4096)


def positive_int(text: str) -> int:
    """argparse type for --seq and --batch: the error names the bad value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer") from None
    if value < 1 or str(value) != text.strip().lstrip("+"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive finite number")
    return value


def fraction(text: str) -> float:
    """argparse type for a share of a whole: a number in (0, 1)."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1)")
    return value


@dataclass(frozen=True)
class Thresholds:
    vram_limit_gb: float = 8.0
    vram_gate_seq: int = 4096  # the VRAM limit applies at this seq and above
    min_grad: float = 1e-5
    max_grad: float = 1e3  # stability: per-layer gradient norms inside [min_layer_grad, max_grad]
    min_layer_grad: float = 1e-6
    max_ppl_degradation: float = 0.05
    min_r2: float = 0.95
    max_loglog_slope: float = 1.15
    min_loglog_slope: float = 0.5  # scaling: below it at N_max a fixed cost hides the growth
    max_quadratic_share: float = 0.1  # scaling: the N² term's share of t(N_max)
    scaling_z: float = 2.0  # scaling: standard errors a fact must clear its threshold by
    min_speedup: float | None = None  # tokens/s over the matched transformer; None: recorded only

    def linear_gate(self):
        from muse.measure.scaling import LinearGate

        return LinearGate(
            self.min_r2,
            self.max_loglog_slope,
            self.min_loglog_slope,
            self.max_quadratic_share,
            self.scaling_z,
        )


@dataclass(frozen=True)
class Settings:
    models: tuple[tuple[str, str], ...]
    seqs: tuple[int, ...]
    dtype: str
    batch: int
    device: torch.device
    device_requested: str
    results_dir: Path | None
    thresholds: Thresholds = field(default_factory=Thresholds)
    quality: QualitySettings | None = None  # the perplexity gate's recipe (muse.training.quality)
    # CUDA float32 matmuls may use TF32 in the criteria (training's default: TrainConfig.tf32)
    tf32: bool = True

    def describe(self) -> dict:
        d = {
            "models": [f"{m}:{p}" for m, p in self.models],
            "seqs": list(self.seqs),
            "dtype": self.dtype,
            "batch": self.batch,
            "device": str(self.device),
            "tf32": self.tf32,
            "thresholds": dataclasses.asdict(self.thresholds),
        }
        if self.quality is not None:
            d["perplexity"] = self.quality.describe()
        return d

    def cases(self) -> list[Case]:
        return [self.case(m, p, s) for m, p in self.models for s in self.seqs]

    def longest_cases(self) -> list[Case]:
        return [self.case(m, p, max(self.seqs)) for m, p in self.models]

    def model_cases(self) -> list[Case]:
        return [self.case(m, p, None) for m, p in self.models]

    def case(self, model: str, preset: str, seq: int | None) -> Case:
        return Case(model, preset, seq, self.seqs, self.dtype, self.batch, self.device)


@functools.cache
def _num_params(model: str, preset: str) -> int:
    from muse import models

    with torch.device("meta"):  # counts without allocating
        return models.build(model, preset).num_params()


def parse_models(specs: list[str] | None) -> tuple[tuple[str, str], ...]:
    """Registry specs (`name` or `name:preset`) → (name, preset); unknown ones raise ValueError
    listing the valid names. No specs: every family that needs no optional extra (the fla peers
    run when named), at its default preset."""
    from muse import models

    specs = specs or models.default_names()
    resolved = tuple(models.resolve(s) for s in specs)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"--model lists a model twice: {' '.join(specs)}")
    return resolved


@dataclass(frozen=True)
class Case:
    model: str
    preset: str
    seq: int | None  # None for criteria that sweep every seq (scaling)
    seqs: tuple[int, ...]
    dtype: str
    batch: int
    device: torch.device

    @property
    def spec(self) -> str:
        return f"{self.model}:{self.preset}"

    @property
    def id(self) -> str:
        seq = f"-seq{self.seq}" if self.seq is not None else ""
        return f"{self.spec}{seq}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        from muse.measure.phases import torch_dtype

        return torch_dtype(self.dtype)

    def num_params(self) -> int:
        return _num_params(self.model, self.preset)

    def build(self, seed: int = 0, **overrides) -> nn.Module:
        """The model with seeded weights, created directly on the case's device."""
        from muse import models

        torch.manual_seed(seed)
        with torch.device(self.device):
            return models.build(self.model, self.preset, **overrides)

    def ids(self, model: nn.Module, seq: int | None = None, seed: int = 0) -> torch.Tensor:
        from muse.measure.phases import random_ids

        seq = seq if seq is not None else self.seq
        if seq is None:
            raise ValueError(f"case {self.id} sweeps every seq: pass seq explicitly")
        return random_ids(model.config.vocab_size, self.batch, seq, self.device, seed)


@dataclass(frozen=True)
class KernelCase:
    """A kernel benchmark case (no model): `bk_core:triton-seq65536-c64`."""

    model: str  # the op
    preset: str  # the implementation, e.g. "triton" or "scan"
    seq: int | None
    batch: int
    channels: int
    dtype: str
    device: torch.device

    @property
    def id(self) -> str:
        seq = f"-seq{self.seq}" if self.seq is not None else ""
        return f"{self.model}:{self.preset}{seq}-c{self.channels}"
