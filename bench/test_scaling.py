"""O(N) time: over every --seq, the forward and the training step fit a line with R² > --min-r2
and the log-log slope over the top doubling is ≤ --max-loglog-slope. The harness calibrates
itself with transformer-eager (materialised N×N attention) at the matched size: when that O(N²)
control passes too, the seqs are too short to tell and the verdict is INCONCLUSIVE, never PASS."""

import pytest

from muse import models
from muse.measure.phases import PHASES
from muse.measure.scaling import fit_scaling, passes_linear_gate
from muse.measure.timing import time_sweep
from muse.summary import describe

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
CONTROL = "transformer-eager"


def sweep_fit(case, phase):
    model = case.build()
    stats = time_sweep(model, case.seqs, phase, case.torch_dtype, case.batch, case.device)
    return fit_scaling(case.seqs, [s.median_s for s in stats]), stats


def control_fit(model_case, phase, muse_session, muse_settings):
    preset = models.baseline_for(model_case.model, model_case.preset)[1]
    key = ("scaling-control", preset, phase)
    if key not in muse_session.cache:
        muse_session.cache[key] = sweep_fit(muse_settings.case(CONTROL, preset, None), phase)[0]
    return muse_session.cache[key]


@pytest.mark.parametrize("phase", PHASES)
def test_time_grows_linearly(model_case, phase, record, muse_settings, muse_session):
    t = muse_settings.thresholds
    if len(model_case.seqs) < 3:
        pytest.skip(f"a scaling fit needs ≥ 3 --seq values, got {len(model_case.seqs)}")
    fit, stats = sweep_fit(model_case, phase)
    for seq, s in zip(model_case.seqs, stats, strict=True):
        record(
            model_case,
            f"{phase}_time_s",
            s.median_s,
            "s",
            seq=seq,
            extra={"iqr_s": s.iqr_s, "rounds": s.rounds},
        )
    if model_case.model == CONTROL:
        control = fit
    else:
        control = control_fit(model_case, phase, muse_session, muse_settings)
    control_passes = passes_linear_gate(control, t.min_r2, t.max_loglog_slope)
    inconclusive = passes_linear_gate(fit, t.min_r2, t.max_loglog_slope) and control_passes
    status = "INCONCLUSIVE" if inconclusive else None
    facts = {
        "phase": phase,
        "best_model": fit.best_model,
        "residuals": fit.residuals,
        "loglog_slope": fit.loglog_slope,
        "control": CONTROL,
        "control_loglog_slope_top": control.loglog_slope_top,
        "control_linear_r2": control.linear_r2,
        "control_passes": control_passes,
    }
    verdicts = [
        record(
            model_case,
            f"{phase}_linear_r2",
            fit.linear_r2,
            "1",
            threshold=t.min_r2,
            comparison=">",
            status=status,
            extra=facts,
        ),
        record(
            model_case,
            f"{phase}_loglog_slope_top",
            fit.loglog_slope_top,
            "1",
            threshold=t.max_loglog_slope,
            comparison="<=",
            status=status,
            extra=facts,
        ),
    ]
    if inconclusive:
        pytest.skip(
            f"INCONCLUSIVE: {describe(verdicts[1])}, but the O(N²) control {CONTROL} passes too"
            f" (slope {control.loglog_slope_top:.3f}, R² {control.linear_r2:.4f}): use longer seqs"
        )
    failed = [describe(r) for r in verdicts if not r.passed]
    assert not failed, "; ".join(failed) + f" (best fit: {fit.best_model})"
