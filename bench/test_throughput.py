"""Tokens/s of the forward and the training step through pytest-benchmark (so
`--benchmark-compare` tracks it across commits), with peak memory in `extra_info`, and the
speed ratio to the `transformer` of matched size (gated only when --min-speedup is given)."""

import math

import pytest
import torch

from muse import models
from muse.measure.phases import PHASES, make_phase, synchronize
from muse.measure.timing import time_callable
from muse.summary import describe

pytestmark = pytest.mark.gpu
WARMUP, ROUNDS = 3, 10


def events_median_s(case, phase, model_name, preset, cache):
    """Model and baseline are timed the same way (CUDA events) for the ratio; the baseline once
    per session and seq."""
    key = ("throughput", model_name, preset, case.seq, phase)
    if key not in cache:
        other = case.__class__(
            model_name, preset, case.seq, case.seqs, case.dtype, case.batch, case.device
        )
        model = other.build()
        fn = make_phase(phase, model, other.ids(model), other.torch_dtype)
        cache[key] = time_callable(fn, case.device, WARMUP, ROUNDS).median_s
    return cache[key]


@pytest.mark.parametrize("phase", PHASES)
def test_tokens_per_second(case, phase, benchmark, record, muse_settings, muse_session):
    if benchmark.disabled:
        pytest.skip("pytest-benchmark is disabled (--benchmark-disable, or xdist): not measured")
    model = case.build()
    fn = make_phase(phase, model, case.ids(model), case.torch_dtype)

    def target():
        fn()
        synchronize(case.device)

    if case.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(case.device)
    benchmark.group = f"{phase}-seq{case.seq}"
    benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    median_s = benchmark.stats.stats.median
    tokens_per_s = case.batch * case.seq / median_s
    peak = torch.cuda.max_memory_allocated(case.device) if case.device.type == "cuda" else None
    benchmark.extra_info.update(
        tokens_per_s=tokens_per_s,
        peak_allocated_bytes=peak,
        seq=case.seq,
        batch=case.batch,
        dtype=case.dtype,
        phase=phase,
    )
    rec = record(
        case,
        f"{phase}_tokens_per_s",
        tokens_per_s,
        "tokens/s",
        extra={"median_s": median_s, "peak_allocated_bytes": peak, "summary": True},
    )
    assert math.isfinite(rec.value) and rec.value > 0, describe(rec)

    base_name, base_preset = models.baseline_for(case.model, case.preset)
    if (base_name, base_preset) == (case.model, case.preset):
        return  # the baseline itself: its ratio is 1 by definition
    cache = muse_session.cache
    own = events_median_s(case, phase, case.model, case.preset, cache)
    base = events_median_s(case, phase, base_name, base_preset, cache)
    min_speedup = muse_settings.thresholds.min_speedup
    ratio = record(
        case,
        f"{phase}_speedup_vs_{base_name}",
        base / own,
        "1",
        threshold=min_speedup,
        comparison=">=" if min_speedup else None,
        extra={"baseline": f"{base_name}:{base_preset}", "summary": True},
    )
    if min_speedup is not None:
        assert ratio.passed, describe(ratio)
