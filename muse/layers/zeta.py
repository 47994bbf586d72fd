"""Riemann zeta zeros and the tables built from them (DESIGN §3.3).

`zeta_zeros(n)` gives γ_1 < … < γ_n, the imaginary parts of the first n nontrivial zeros
ρ = ½ + iγ of ζ, each the correctly rounded double of mpmath's value at 30 digits. mpmath
takes milliseconds to a second per zero, so they are computed once: kept in-process, and on
disk in one file holding the longest list computed so far (any shorter request is its prefix).

`zeta_token_table(rows, dim)` is the sinusoidal table at zeta-zero frequencies that
`zeta_init` puts in a model's token embedding.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from muse.fileio import atomic_write_text

DEFAULT_CACHE_DIR = Path("~/.cache/muse")
CACHE_NAME = "zeta-zeros.json"
DIGITS = 30  # working precision: well past the 17 digits a double needs
FIRST_ZERO = 14.134725141734695  # γ_1, to tell a cache file of zeta zeros from anything else


def _compute(first: int, last: int) -> list[float]:
    """γ_first … γ_last (1-based), each rounded once from a 30-digit value."""
    import mpmath

    with mpmath.workdps(DIGITS):
        return [float(mpmath.zetazero(j).imag) for j in range(first, last + 1)]


def _read_cache(path: Path) -> list[float]:
    """The cached zeros, or [] when the file is missing or is not a plausible list of them
    (then it is recomputed and rewritten, never trusted)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))["zeros"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(values, list) or not all(isinstance(v, float) for v in values):
        return []
    if values and (values[0] != FIRST_ZERO or values != sorted(set(values))):
        return []
    return values


@functools.cache
def _zeros(n: int, cache_dir: str) -> tuple[float, ...]:
    path = Path(cache_dir).expanduser() / CACHE_NAME
    cached = _read_cache(path)
    if len(cached) < n:
        cached = cached + _compute(len(cached) + 1, n)
        atomic_write_text(path, json.dumps({"digits": DIGITS, "zeros": cached}))
    return tuple(cached[:n])


def zeta_zeros(n: int, cache_dir: str | Path | None = None) -> tuple[float, ...]:
    """Imaginary parts of the first n nontrivial zeros of ζ: (14.1347…, 21.0220…, …).

    Cached in-process per (n, cache_dir) and on disk under `cache_dir` (default ~/.cache/muse).
    Cost of a cold call on a CPU core: ~2 s for n = 64, ~85 s for n = 512."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the number of zeta zeros) must be a positive integer, got {n!r}")
    return _zeros(n, str(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR))


def zeta_token_table(rows: int, dim: int, std: float = 0.02) -> torch.Tensor:
    """The (rows × dim) float64 table E[v, 2j] = s·sin(γ_{j+1} v), E[v, 2j+1] = s·cos(γ_{j+1} v),
    j = 0 … ⌈dim/2⌉ − 1, the last column dropped when dim is odd; s = std·√2, so every column
    has root-mean-square ≈ std, the scale of the usual N(0, std²) embedding init.

    The frequencies are the zeros themselves, in radians per token id. They wrap around the
    circle at angles no two of which are commensurate, so rows of different ids are nearly
    orthogonal: ⟨E_v, E_w⟩ = s² Σ_j cos(γ_j (v − w)) is ~√dim against dim on the diagonal.
    """
    if rows < 1 or dim < 1:
        raise ValueError(f"rows and dim must be ≥ 1, got {rows}, {dim}")
    gamma = torch.tensor(zeta_zeros(-(-dim // 2)), dtype=torch.float64)
    angle = torch.arange(rows, dtype=torch.float64)[:, None] * gamma  # exact ints × doubles
    table = torch.stack((torch.sin(angle), torch.cos(angle)), dim=-1).reshape(rows, -1)
    return table[:, :dim] * (std * math.sqrt(2.0))
