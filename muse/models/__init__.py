"""Model families by name: `build("transformer", "small", n_layers=2)`, `names()`."""

from muse.models import fla_peers, phase1, phase2, phase3, phase7, phase8, transformer  # noqa: F401
from muse.models.config import StrictConfig
from muse.models.registry import (
    baseline_for,
    build,
    config,
    default_names,
    family,
    names,
    presets,
    resolve,
)

__all__ = [
    "StrictConfig",
    "baseline_for",
    "build",
    "config",
    "family",
    "default_names",
    "names",
    "presets",
    "resolve",
]
