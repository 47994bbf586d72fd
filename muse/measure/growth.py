"""A model's time curve over every seq, and its growth verdict (muse.measure.scaling).

Where the verdict hangs on timing noise, the seqs are timed again with more rounds, pooled with
the first. A negative control's out-of-memory, or a CUDA graph that cannot capture it, is caught
here and becomes its verdict; the model under test's own propagates and fails its case.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch

from muse.measure.graphs import GraphCaptureError
from muse.measure.scaling import Growth, LinearGate, ScalingFit, fit_scaling, judge_growth
from muse.measure.timing import TimingStats, summarize, time_sweep

ROUNDS = 10
MORE_ROUNDS = 40


@dataclass(frozen=True)
class Curve:
    spec: str  # model:preset
    phase: str
    seqs: tuple[int, ...]  # the seqs it was timed at (fewer than asked after an out-of-memory)
    stats: tuple[TimingStats, ...]
    fit: ScalingFit | None  # None with fewer than 3 seqs timed
    growth: Growth
    retimed: bool = False

    def describe(self) -> dict:
        """The facts a verdict record carries about this curve."""
        d = {
            "verdict": self.growth.verdict,
            "reasons": list(self.growth.reasons),
            "seqs": list(self.seqs),
            "times_s": [s.median_s for s in self.stats],
            "rounds": [s.rounds for s in self.stats],
        }
        if self.fit is not None:
            d |= {
                "loglog_slope_top": self.fit.loglog_slope_top,
                "loglog_slope_top_sd": self.fit.loglog_slope_top_sd,
                "quadratic_share": self.fit.quadratic_share,
                "quadratic_share_sd": self.fit.quadratic_share_sd,
                "linear_r2": self.fit.linear_r2,
            }
        return d


def _judge(seqs, stats, gate: LinearGate) -> tuple[ScalingFit, Growth]:
    fit = fit_scaling(list(seqs), [s.median_s for s in stats], [s.error_s for s in stats])
    return fit, judge_growth(fit, gate)


def time_curve(case, phase: str, gate: LinearGate, *, control: bool = False) -> Curve:
    """`case` is a muse.harness.cases.Case over every seq (seq None). A control that runs out of
    memory at a seq keeps the seqs before it and gets Growth.out_of_memory; one that a graphed
    phase cannot capture, Growth.not_timed."""
    model = case.build()
    stats: list[TimingStats] = []
    for seq in case.seqs:
        try:
            stats += time_sweep(model, [seq], phase, case.torch_dtype, case.batch, case.device,
                                rounds=ROUNDS)
        except (torch.OutOfMemoryError, GraphCaptureError) as exc:
            if not control:
                raise
            message = str(exc).splitlines()[0]
            traceback.clear_frames(exc.__traceback__)
            del model
            from muse.measure.memory import free_device_memory

            free_device_memory()
            seqs = case.seqs[: len(stats)]
            fit = _judge(seqs, stats, gate)[0] if len(stats) >= 3 else None
            oom = isinstance(exc, torch.OutOfMemoryError)
            growth = (Growth.out_of_memory if oom else Growth.not_timed)(seq, message)
            return Curve(case.spec, phase, seqs, tuple(stats), fit, growth)
    fit, growth = _judge(case.seqs, stats, gate)
    if not growth.hangs_on_noise:
        return Curve(case.spec, phase, case.seqs, tuple(stats), fit, growth)
    more = time_sweep(model, case.seqs, phase, case.torch_dtype, case.batch, case.device,
                      rounds=MORE_ROUNDS)
    pooled = tuple(summarize([*a.times_s, *b.times_s]) for a, b in zip(stats, more, strict=True))
    fit, growth = _judge(case.seqs, pooled, gate)
    return Curve(case.spec, phase, case.seqs, pooled, fit, growth, retimed=True)
