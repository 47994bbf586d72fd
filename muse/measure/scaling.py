"""How measured time grows with sequence length, and whether that growth is linear.

Two facts decide: the log-log slope over the top doubling (every seq in N_max/2 … N_max), and
the share of t(N_max) that is the N² term of a fit t = a + bN + cN² (a, b, c ≥ 0, relative
error) over the top two doublings. A fixed launch cost a flattens a log-log slope and a linear
R² enough to pass a quadratic curve; it cannot hide the N² term from that fit. The verdict is
three-way: FAIL when time grows faster than N at the top, PASS when the curve is a line there
(no N² share, time growing, points on a line), INCONCLUSIVE when these seqs cannot say, or when
the verdict hangs on timing noise (each time's standard error, carried through both facts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise

import numpy as np

# Candidate growth laws t = a + b·f(N). The base of the log is absorbed into b.
MODELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "N": lambda n: n,
    "N log N": lambda n: n * np.log(n),
    "N^2": lambda n: n * n,
}
WINDOW_SPAN = 4  # the N² fit covers N_max/4 … N_max: the top two doublings
NOISE_DRAWS = 400  # Monte Carlo draws that carry the timing errors through the N² fit


@dataclass(frozen=True)
class ScalingFit:
    seqs: tuple[int, ...]  # ascending
    times_s: tuple[float, ...]  # in the order of seqs
    errors_s: tuple[float, ...]  # standard error of each time (0: taken as exact)
    linear_r2: float  # R² of least-squares t = a + b·N over every point
    linear_slope_s: float  # b, seconds per token
    linear_intercept_s: float  # a
    loglog_slope: float  # least-squares slope of log t against log N, all points
    best_model: str  # key of MODELS with the least relative residual
    residuals: dict[str, float]  # relative RMS residual of each candidate fit
    loglog_slope_top: float  # slope of log t against log N over the seqs ≥ N_max/2 (≥ 2)
    loglog_slope_top_sd: float  # its standard deviation from the timing errors
    window: tuple[int, ...]  # the seqs of the N² fit: N ≥ N_max/4, at least 3
    overhead_share: float  # a / t(N_max) of the fit a + bN + cN² over the window
    quadratic_share: float  # cN_max² / t(N_max)
    quadratic_share_sd: float


@dataclass(frozen=True)
class LinearGate:
    min_r2: float  # R² of a line through every point
    max_loglog_slope: float  # at N_max; above it (beyond noise) the time grows faster than N
    min_loglog_slope: float  # at N_max; below it a fixed cost hides how the time grows
    max_quadratic_share: float  # of t(N_max)
    z: float  # standard deviations a fact must clear its threshold by


@dataclass(frozen=True)
class Growth:
    """One curve's verdict: PASS, FAIL or INCONCLUSIVE, with the reasons it is not a PASS."""

    verdict: str
    reasons: tuple[str, ...] = ()
    hangs_on_noise: bool = False  # a PASS is within the timing errors: more rounds may tell
    measured: bool = True  # False: no curve was timed, so nothing is known of its growth

    @classmethod
    def out_of_memory(cls, seq: int, message: str) -> Growth:
        # Running out of memory where a linear model of the same size fits is super-linear
        # cost shown by other means.
        return cls("FAIL", (f"out of memory at seq {seq}: {message}",))

    @classmethod
    def not_timed(cls, seq: int, message: str) -> Growth:
        # A workload that cannot run (a CUDA graph that cannot hold it) shows no cost at all.
        return cls("INCONCLUSIVE", (f"cannot be timed at seq {seq}: {message}",), measured=False)


def _validate(seqs: Sequence, times_s: Sequence, errors_s: Sequence | None) -> list[tuple]:
    seqs, times_s = list(seqs), list(times_s)
    if len(seqs) != len(times_s):
        raise ValueError(f"seqs and times_s differ in length: {len(seqs)} != {len(times_s)}")
    errors_s = [0.0] * len(seqs) if errors_s is None else list(errors_s)
    if len(errors_s) != len(seqs):
        raise ValueError(f"errors_s and seqs differ in length: {len(errors_s)} != {len(seqs)}")
    if len(seqs) < 3:
        raise ValueError(f"a scaling fit needs at least 3 points, got {len(seqs)}")
    points = []
    for n, t, e in zip(seqs, times_s, errors_s, strict=True):
        # bool is an int subclass and 1024.0 is not a length; both are caller mistakes.
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"seq must be a positive int, got {n!r}")
        try:
            t_s, e_s = float(t), float(e)
        except (TypeError, ValueError):
            raise ValueError(f"time must be a number, got {t!r} at seq {n}") from None
        if not math.isfinite(t_s) or t_s <= 0:
            raise ValueError(f"time must be finite and > 0, got {t!r} at seq {n}")
        if not math.isfinite(e_s) or e_s < 0:
            raise ValueError(f"error must be finite and ≥ 0, got {e!r} at seq {n}")
        points.append((int(n), t_s, e_s))
    points.sort()
    for (n0, *_), (n1, *_) in pairwise(points):
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


def nonnegative_quadratic(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(a, b, c) ≥ 0 minimising Σ((a + bx + cx²)/t − 1)² for each row of t (draws × points).

    With three unknowns the constrained optimum is the plain least-squares solution on one of
    the seven supports, the feasible one with the least residual; every support is solved for
    every draw at once."""
    t = np.atleast_2d(t)
    design = np.column_stack([np.ones_like(x), x, x * x])  # points × 3
    w = 1.0 / t  # draws × points
    best = np.full((t.shape[0], 3), np.nan)
    best_res = np.full(t.shape[0], np.inf)
    for size in (1, 2, 3):
        for support in combinations(range(3), size):
            cols = design[:, support]
            rows = w[:, :, None] * cols[None]  # draws × points × size
            gram = np.einsum("dpi,dpj->dij", rows, rows)
            rhs = rows.sum(axis=1)
            coef = np.linalg.solve(gram, rhs[..., None])[..., 0]
            res = ((np.einsum("dpi,di->dp", rows, coef) - 1.0) ** 2).sum(axis=1)
            ok = (coef >= 0).all(axis=1) & (res < best_res)
            full = np.zeros((t.shape[0], 3))
            full[:, support] = coef
            best[ok], best_res[ok] = full[ok], res[ok]
    return best


def _shares(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The overhead's and the N² term's shares of the fit at x = 1 (N_max), per row of t."""
    a, b, c = nonnegative_quadratic(x, t).T
    top = a + b + c
    return a / top, c / top


def _top_slope(n: np.ndarray, t: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    """Least-squares log-log slope over the top doubling, and its standard deviation: the
    slope is linear in log t, whose error is e/t to first order."""
    top = n >= n[-1] / 2
    top[-2:] = True
    x = np.log(n[top])
    weights = (x - x.mean()) / np.sum((x - x.mean()) ** 2)
    slope = float(weights @ np.log(t[top]))
    return slope, float(np.sqrt(np.sum((weights * e[top] / t[top]) ** 2)))


def fit_scaling(
    seqs: Sequence[int], times_s: Sequence[float], errors_s: Sequence[float] | None = None
) -> ScalingFit:
    points = _validate(seqs, times_s, errors_s)
    n = np.array([p[0] for p in points], dtype=np.float64)
    t = np.array([p[1] for p in points], dtype=np.float64)
    e = np.array([p[2] for p in points], dtype=np.float64)

    slope, intercept = np.polyfit(n, t, 1)
    ss_res = float(np.sum((t - (intercept + slope * n)) ** 2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    # Constant times leave nothing to explain; the line fits them exactly.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    loglog_slope = float(np.polyfit(np.log(n), np.log(t), 1)[0])
    residuals = {name: _relative_fit(f(n), t) for name, f in MODELS.items()}

    # The lower seqs of a GPU curve sit on its knee (a flat launch cost giving way to work):
    # curvature there says nothing about N², so the fit looks at the top of the range only.
    top = n >= n[-1] / WINDOW_SPAN
    top[-3:] = True
    x, tw, ew = n[top] / n[-1], t[top], e[top]
    overhead, quadratic = (float(v[0]) for v in _shares(x, tw[None]))
    quadratic_sd = 0.0
    if ew.any():
        # Log-normal draws keep every time positive; seeded, so a verdict is reproducible.
        rng = np.random.default_rng(0)
        draws = tw * np.exp(rng.standard_normal((NOISE_DRAWS, tw.size)) * (ew / tw))
        quadratic_sd = float(_shares(x, draws)[1].std())
    slope_top, slope_top_sd = _top_slope(n, t, e)

    return ScalingFit(
        seqs=tuple(p[0] for p in points),
        times_s=tuple(p[1] for p in points),
        errors_s=tuple(p[2] for p in points),
        linear_r2=float(r2),
        linear_slope_s=float(slope),
        linear_intercept_s=float(intercept),
        loglog_slope=loglog_slope,
        best_model=min(residuals, key=residuals.get),
        residuals=residuals,
        loglog_slope_top=slope_top,
        loglog_slope_top_sd=slope_top_sd,
        window=tuple(int(v) for v in n[top]),
        overhead_share=overhead,
        quadratic_share=quadratic,
        quadratic_share_sd=quadratic_sd,
    )


def judge_growth(fit: ScalingFit, gate: LinearGate) -> Growth:
    n_max = fit.seqs[-1]
    s, ds = fit.loglog_slope_top, gate.z * fit.loglog_slope_top_sd
    q, dq = fit.quadratic_share, gate.z * fit.quadratic_share_sd
    pm = f" ± {ds:.3f}" if ds else ""
    if s - ds > gate.max_loglog_slope:
        return Growth("FAIL", (
            f"time grows faster than N at seq {n_max}: log-log slope {s:.3f}{pm}"
            f" > {gate.max_loglog_slope}",
        ))
    reasons, noise = [], []
    if s + ds > gate.max_loglog_slope:
        reasons.append(f"log-log slope at seq {n_max} {s:.3f}{pm} is within noise of"
                       f" {gate.max_loglog_slope}")
        noise.append(True)
    if q + dq > gate.max_quadratic_share:
        reasons.append(f"the N² term of a + bN + cN² over seqs {fit.window[0]}–{n_max} is"
                       f" {q:.3f}{f' ± {dq:.3f}' if dq else ''} of t({n_max})"
                       f" > {gate.max_quadratic_share}")
        noise.append(q - dq <= gate.max_quadratic_share)
    if s - ds < gate.min_loglog_slope:
        reasons.append(f"fixed cost hides the growth: log-log slope at seq {n_max} {s:.3f}{pm}"
                       f" < {gate.min_loglog_slope}")
        noise.append(s + ds >= gate.min_loglog_slope)
    if fit.linear_r2 <= gate.min_r2:
        reasons.append(f"the times are off a line: R² {fit.linear_r2:.4f} ≤ {gate.min_r2}")
        noise.append(False)
    if not reasons:
        return Growth("PASS")
    return Growth("INCONCLUSIVE", tuple(reasons), hangs_on_noise=all(noise))


def judge_against_controls(model: Growth, controls: Mapping[str, Growth]) -> tuple[str, str]:
    """The verdict of a model's curve given its O(N²) controls on the same seqs: a PASS stands
    only if every control was timed and none passes too."""
    if model.verdict != "PASS":
        return model.verdict, "; ".join(model.reasons)
    passing = [name for name, growth in controls.items() if growth.verdict == "PASS"]
    if passing:
        return "INCONCLUSIVE", (
            f"these seqs cannot tell O(N) from O(N²): the O(N²) control {', '.join(passing)}"
            " passes too; use longer seqs"
        )
    untimed = [f"{name} {growth.reasons[0]}" for name, growth in controls.items()
               if not growth.measured]
    if untimed:
        # an untimed control might have passed: without it these seqs are not calibrated
        return "INCONCLUSIVE", (
            f"linear, but the O(N²) control {'; '.join(untimed)}: a PASS needs every control "
            "timed on these seqs"
        )
    return "PASS", "linear, and no O(N²) control passes on these seqs: " + ", ".join(
        f"{name} {growth.verdict}" for name, growth in controls.items()
    )
