import math

import numpy as np
import pytest

from muse.measure.scaling import MODELS, fit_scaling, passes_linear_gate

GATE = dict(min_r2=0.95, max_loglog_slope=1.15)  # the harness defaults (DESIGN §4)
SEQS_1K_4K = [1024, 2048, 3072, 4096]
SEQS_POW2 = [1024 * 2**k for k in range(5)]


def test_quadratic_curve_fools_r2_but_not_the_top_slope():
    fit = fit_scaling(SEQS_1K_4K, [1e-9 * n * n for n in SEQS_1K_4K])
    # Over 1k–4k a parabola is almost a line: R² = 0.9690, above the 0.95 gate.
    assert fit.linear_r2 == pytest.approx(0.96899, abs=1e-4)
    assert fit.linear_r2 > GATE["min_r2"]
    assert fit.loglog_slope_top == pytest.approx(2.0, abs=1e-12)
    assert fit.best_model == "N^2"
    assert not passes_linear_gate(fit, **GATE)


def test_linear_curve_with_intercept_passes():
    times = [0.003 + 2e-6 * n for n in SEQS_1K_4K]
    fit = fit_scaling(SEQS_1K_4K, times)
    assert fit.linear_r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.linear_slope_s == pytest.approx(2e-6, rel=1e-9)
    assert fit.linear_intercept_s == pytest.approx(0.003, rel=1e-6)
    # A fixed cost flattens the log-log slope below 1: log(11.192/9.144) / log(4/3) = 0.702.
    assert fit.loglog_slope_top == pytest.approx(0.7025, abs=1e-4)
    assert passes_linear_gate(fit, **GATE)


@pytest.mark.parametrize("model", list(MODELS))
def test_each_growth_law_is_recognised(model):
    n = np.array(SEQS_POW2, dtype=float)
    growth = 1e-9 * MODELS[model](n)
    times = 0.05 * growth[0] + growth  # an intercept of 5 % of the shortest time
    fit = fit_scaling(SEQS_POW2, times.tolist())
    assert fit.best_model == model
    assert fit.residuals[model] < 1e-9
    others = [r for name, r in fit.residuals.items() if name != model]
    assert min(others) > 0.03  # ≈ 0.037 at the closest (N against N log N)


def test_one_percent_noise_on_a_linear_curve_still_passes():
    rng = np.random.default_rng(0)
    n = np.array(SEQS_POW2, dtype=float)
    times = (1e-3 + 2e-6 * n) * (1 + 0.01 * rng.standard_normal(n.size))
    fit = fit_scaling(SEQS_POW2, times.tolist())
    assert fit.linear_r2 > 0.999
    assert 0.9 < fit.loglog_slope_top < 1.1
    assert passes_linear_gate(fit, **GATE)


def test_input_order_does_not_matter():
    times = [0.001 * n for n in SEQS_1K_4K]
    fit = fit_scaling(SEQS_1K_4K[::-1], times[::-1])
    assert fit.seqs == tuple(SEQS_1K_4K)
    assert fit.times_s == tuple(times)
    assert fit.loglog_slope == pytest.approx(1.0)


@pytest.mark.parametrize(
    "seqs, times, match",
    [
        ([1024, 2048, 3072], [1.0, 2.0], r"differ in length: 3 != 2"),
        ([1024, 2048], [1.0, 2.0], r"at least 3 points, got 2"),
        ([1024, -5, 3072], [1.0, 2.0, 3.0], r"positive int, got -5"),
        ([1024, 2048.0, 3072], [1.0, 2.0, 3.0], r"positive int, got 2048\.0"),
        ([1024, True, 3072], [1.0, 2.0, 3.0], r"positive int, got True"),
        ([1024, 2048, 2048], [1.0, 2.0, 3.0], r"duplicate seq 2048"),
        ([1024, 2048, 3072], [1.0, math.nan, 3.0], r"got nan at seq 2048"),
        ([1024, 2048, 3072], [1.0, math.inf, 3.0], r"got inf at seq 2048"),
        ([1024, 2048, 3072], [1.0, 2.0, 0.0], r"> 0, got 0\.0 at seq 3072"),
        ([1024, 2048, 3072], [1.0, 2.0, -1.5], r"got -1\.5 at seq 3072"),
        ([1024, 2048, 3072], [1.0, "x", 3.0], r"got 'x' at seq 2048"),
    ],
)
def test_bad_input_is_named(seqs, times, match):
    with pytest.raises(ValueError, match=match):
        fit_scaling(seqs, times)
