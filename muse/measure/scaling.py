"""How measured time grows with sequence length: linear fit, log-log slope, best growth model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

# Candidate growth laws t = a + b·f(N). The base of the log is absorbed into b.
MODELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "N": lambda n: n,
    "N log N": lambda n: n * np.log(n),
    "N^2": lambda n: n * n,
}


@dataclass(frozen=True)
class ScalingFit:
    seqs: tuple[int, ...]  # ascending
    times_s: tuple[float, ...]  # in the order of seqs
    linear_r2: float  # R² of least-squares t = a + b·N
    linear_slope_s: float  # b, seconds per token
    linear_intercept_s: float  # a
    loglog_slope: float  # least-squares slope of log t against log N, all points
    loglog_slope_top: float  # the same slope between the two largest N only
    best_model: str  # key of MODELS with the least relative residual
    residuals: dict[str, float]  # relative RMS residual of each candidate fit


def _validate(seqs: Sequence, times_s: Sequence) -> list[tuple[int, float]]:
    seqs, times_s = list(seqs), list(times_s)
    if len(seqs) != len(times_s):
        raise ValueError(f"seqs and times_s differ in length: {len(seqs)} != {len(times_s)}")
    if len(seqs) < 3:
        raise ValueError(f"a scaling fit needs at least 3 points, got {len(seqs)}")
    points = []
    for n, t in zip(seqs, times_s, strict=True):
        # bool is an int subclass and 1024.0 is not a length; both are caller mistakes.
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"seq must be a positive int, got {n!r}")
        try:
            t_s = float(t)
        except (TypeError, ValueError):
            raise ValueError(f"time must be a number, got {t!r} at seq {n}") from None
        if not math.isfinite(t_s) or t_s <= 0:
            raise ValueError(f"time must be finite and > 0, got {t!r} at seq {n}")
        points.append((int(n), t_s))
    points.sort()
    for (n0, _), (n1, _) in pairwise(points):
        if n0 == n1:
            raise ValueError(f"duplicate seq {n0}")
    return points


def _relative_fit(f: np.ndarray, t: np.ndarray) -> float:
    # Timings span orders of magnitude, so an absolute fit would be decided by the largest N
    # alone; dividing each row by t minimises the relative error instead, which is also
    # what we report.
    design = np.column_stack([np.ones_like(f), f]) / t[:, None]
    coef, *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    return float(np.sqrt(np.mean((design @ coef - 1.0) ** 2)))


def fit_scaling(seqs: Sequence[int], times_s: Sequence[float]) -> ScalingFit:
    points = _validate(seqs, times_s)
    n = np.array([p[0] for p in points], dtype=np.float64)
    t = np.array([p[1] for p in points], dtype=np.float64)

    slope, intercept = np.polyfit(n, t, 1)
    ss_res = float(np.sum((t - (intercept + slope * n)) ** 2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    # Constant times leave nothing to explain; the line fits them exactly.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0

    log_n, log_t = np.log(n), np.log(t)
    loglog_slope = float(np.polyfit(log_n, log_t, 1)[0])
    # R² alone cannot reject quadratic growth: a pure N² curve over 1k–4k has a linear R² of
    # about 0.97, above the usual 0.95 gate. The local slope at the largest lengths is where
    # an N² term dominates, and there it reads ≈ 2 instead of ≈ 1.
    loglog_slope_top = float((log_t[-1] - log_t[-2]) / (log_n[-1] - log_n[-2]))

    residuals = {name: _relative_fit(f(n), t) for name, f in MODELS.items()}
    best_model = min(residuals, key=residuals.get)

    return ScalingFit(
        seqs=tuple(p[0] for p in points),
        times_s=tuple(p[1] for p in points),
        linear_r2=float(r2),
        linear_slope_s=float(slope),
        linear_intercept_s=float(intercept),
        loglog_slope=loglog_slope,
        loglog_slope_top=loglog_slope_top,
        best_model=best_model,
        residuals=residuals,
    )


def passes_linear_gate(fit: ScalingFit, min_r2: float, max_loglog_slope: float) -> bool:
    return fit.linear_r2 > min_r2 and fit.loglog_slope_top <= max_loglog_slope
