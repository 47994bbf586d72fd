"""Name → model family registry, so one harness measures every architecture."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from muse.models.config import StrictConfig


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type[StrictConfig]
    model_cls: Callable[[Any], nn.Module]
    presets: dict[str, dict[str, Any]]
    default_preset: str
    # (preset, vocabulary size) → the `transformer` preset matched in parameter count
    baseline: Callable[[str, int], str]
    # why the family cannot run on the CPU (e.g. CUDA-only kernels); "" when it can
    cuda_only: str = ""
    # the pip extra the family needs (e.g. "fla"); such a family runs only when named
    extra: str = ""


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    if family.default_preset not in family.presets:
        raise ValueError(
            f"default preset {family.default_preset!r} of {family.name!r} is not a preset"
        )
    _FAMILIES[family.name] = family
    return family


def names() -> list[str]:
    return sorted(_FAMILIES)


def default_names() -> list[str]:
    """The families a run takes when it names none: those that need no optional extra."""
    return [name for name in names() if not _FAMILIES[name].extra]


def family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}") from None


def presets(name: str) -> list[str]:
    return list(family(name).presets)


def resolve(spec: str) -> tuple[str, str]:
    """'name' or 'name:preset' → (name, preset), validated against the registry."""
    name, _, preset = spec.partition(":")
    fam = family(name)
    preset = preset or fam.default_preset
    if preset not in fam.presets:
        raise ValueError(
            f"unknown preset {preset!r} for model {name!r}; valid presets: {', '.join(fam.presets)}"
        )
    return name, preset


def config(name: str, preset: str | None = None, **overrides: Any) -> StrictConfig:
    name, preset = resolve(f"{name}:{preset}" if preset else name)
    fam = family(name)
    return fam.config_cls.from_dict({**fam.presets[preset], **overrides})


def build(name: str, preset: str | None = None, **overrides: Any) -> nn.Module:
    """Build a model from its registry name, preset and config overrides (unknown keys raise)."""
    fam = family(name.partition(":")[0])
    return fam.model_cls(config(name, preset, **overrides))


def baseline_for(name: str, preset: str, vocab_size: int | None = None) -> tuple[str, str]:
    """The `transformer` preset matched in parameter count to this model (itself for baselines)
    at `vocab_size` (default: the preset's own vocabulary)."""
    if vocab_size is None:
        vocab_size = config(name, preset).vocab_size
    return "transformer", family(name).baseline(preset, vocab_size)


def parse_variants(args: list[str]) -> list[tuple[str, dict]]:
    """Command-line model variants: 'spec', 'spec {json overrides}', or a spec followed by a
    JSON argument → [(spec, overrides)]; a bad spec or override is named before any run
    (KeyError, TypeError or ValueError, json's included)."""
    variants: list[tuple[str, dict]] = []
    for arg in args:
        if arg.lstrip().startswith("{"):
            if not variants:
                raise ValueError(f"overrides {arg!r} follow no model spec")
            spec, over = variants.pop()
            variants.append((spec, {**over, **json.loads(arg)}))
            continue
        spec, _, rest = arg.partition(" ")
        variants.append((spec, json.loads(rest) if rest.strip() else {}))
    for spec, over in variants:
        name, preset = resolve(spec)
        config(name, preset, **over)
    return variants
