"""O(N) time: over every --seq, the forward and the training step grow linearly — the log-log
slope over the top doubling ≤ --max-loglog-slope and ≥ --min-loglog-slope, the N² term of
a + bN + cN² over the top two doublings ≤ --max-quadratic-share of t(N_max), R² > --min-r2,
each clear of timing noise by --scaling-z standard errors (muse.measure.scaling).

The harness calibrates itself with two O(N²) controls at the matched size, timed on the same
seqs: the SDPA `transformer` (O(N²) compute in O(N) memory) and `transformer-eager`
(materialised N×N scores). When a control passes too, these seqs cannot tell O(N) from O(N²)
and the verdict is INCONCLUSIVE, never PASS. A control that runs out of memory has shown
super-linear cost: it counts as failing there and never fails the model under test.

With --cuda-graphs both phases are also timed replayed from a CUDA graph (`graphed_forward`,
`graphed_train_step`; the controls too): the device's work without the launch overhead that
keeps batch-1 times flat at short seqs. A control that a graph cannot capture leaves a PASS
INCONCLUSIVE; the model's own capture failure fails its case."""

import traceback

import pytest
import torch

from muse import models
from muse.harness.summary import describe
from muse.measure.graphs import GraphCaptureError
from muse.measure.growth import time_curve
from muse.measure.memory import free_device_memory
from muse.measure.phases import GRAPHED_PHASES, PHASES
from muse.measure.scaling import judge_against_controls

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
CONTROLS = ("transformer", "transformer-eager")


def curve(case, phase, muse_session, gate, control=False):
    """Each (model, preset, phase) is timed once per session, as a model or as a control; a
    model that ran out of memory or could not be captured as a control is timed again as a
    model, to fail its case."""
    key = ("scaling", case.spec, phase)
    cached = muse_session.cache.get(key)
    if cached is None or (not control and (cached.fit is None or not cached.growth.measured)):
        muse_session.cache[key] = time_curve(case, phase, gate, control=control)
    return muse_session.cache[key]


def check_graphed(case, phase, pytestconfig) -> None:
    """Skips a graphed phase that is not asked for or cannot run here; fails one asked for in a
    dtype no graph can hold (a mistake in the options, wherever it runs)."""
    if not pytestconfig.getoption("cuda_graphs"):
        pytest.skip("--cuda-graphs not given: the graphed phases are not timed")
    if phase == "graphed_train_step" and case.torch_dtype == torch.float16:
        pytest.fail(f"graphed_train_step cannot run in --dtype {case.dtype}: fp16 loss scaling "
                    "checks for inf on the host every step, which a CUDA graph cannot hold; "
                    "pass --dtype bf16 or fp32", pytrace=False)
    if case.device.type != "cuda":
        pytest.skip(f"a CUDA graph needs CUDA; this run is on {case.device}")


@pytest.mark.parametrize("phase", PHASES + GRAPHED_PHASES)
def test_time_grows_linearly(model_case, phase, record, muse_settings, muse_session,
                             pytestconfig):
    t = muse_settings.thresholds
    gate = t.linear_gate()
    if phase in GRAPHED_PHASES:
        check_graphed(model_case, phase, pytestconfig)
    if len(model_case.seqs) < 3:
        pytest.skip(f"a scaling fit needs ≥ 3 --seq values, got {len(model_case.seqs)}")
    try:
        own = curve(model_case, phase, muse_session, gate)
    except GraphCaptureError as exc:
        message = str(exc)
        traceback.clear_frames(exc.__traceback__)  # the failed capture's model and its memory
        free_device_memory()
        pytest.fail(message, pytrace=False)
    matched = models.baseline_for(model_case.model, model_case.preset)[1]
    controls = {
        f"{name}:{matched}": curve(
            muse_settings.case(name, matched, None), phase, muse_session, gate, control=True
        )
        for name in CONTROLS
    }
    for seq, s in zip(own.seqs, own.stats, strict=True):
        record(
            model_case,
            f"{phase}_time_s",
            s.median_s,
            "s",
            seq=seq,
            extra={"iqr_s": s.iqr_s, "rounds": s.rounds, "error_s": s.error_s},
        )
    status, why = judge_against_controls(own.growth, {k: c.growth for k, c in controls.items()})
    fit = own.fit
    facts = {
        "phase": phase,
        "verdict": status,
        "why": why,
        "retimed": own.retimed,
        "best_model": fit.best_model,
        "residuals": fit.residuals,
        "loglog_slope": fit.loglog_slope,
        "loglog_slope_top_sd": fit.loglog_slope_top_sd,
        "quadratic_share_sd": fit.quadratic_share_sd,
        "overhead_share": fit.overhead_share,
        "window": list(fit.window),
        "controls": {k: c.describe() for k, c in controls.items()},
    }
    # Each fact's own comparison, unless the verdict is INCONCLUSIVE: then every row says so.
    inconclusive = "INCONCLUSIVE" if status == "INCONCLUSIVE" else None
    rows = [
        (f"{phase}_linear_r2", fit.linear_r2, t.min_r2, ">"),
        (f"{phase}_loglog_slope_top", fit.loglog_slope_top, t.max_loglog_slope, "<="),
        (f"{phase}_quadratic_share", fit.quadratic_share, t.max_quadratic_share, "<="),
    ]
    verdicts = [
        record(model_case, metric, value, "1", threshold=threshold, comparison=comparison,
               status=inconclusive, extra=facts)
        for metric, value, threshold, comparison in rows
    ]
    if status == "INCONCLUSIVE":
        pytest.skip(f"INCONCLUSIVE: {why}")
    failed = [describe(r) for r in verdicts if not r.passed]
    if status == "FAIL":
        raise AssertionError(f"{why} ({'; '.join(failed)}; best fit: {fit.best_model})")
    assert not failed, "; ".join(failed)
