"""Wall time of a device workload: warm-up, then ≥ 10 timed rounds; median and IQR.

On CUDA each round is bracketed by CUDA events (device time, no host clock skew); on the CPU
by perf_counter. Warm-up keeps compilation, autotuning and allocator growth out of the numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from muse.measure.phases import synchronize


@dataclass(frozen=True)
class TimingStats:
    median_s: float
    iqr_s: float
    min_s: float
    rounds: int
    times_s: tuple[float, ...]

    @property
    def error_s(self) -> float:
        return median_error(self.iqr_s, self.rounds)


def median_error(iqr_s: float, rounds: int) -> float:
    """Standard error of the median of `rounds` times with this IQR: for normal scatter
    σ = IQR / 1.349, and the median's error is √(π/2) σ / √rounds."""
    return math.sqrt(math.pi / 2) * iqr_s / 1.349 / math.sqrt(rounds)


def summarize(times_s: list[float]) -> TimingStats:
    arr = np.asarray(times_s, dtype=float)
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return TimingStats(
        float(med), float(q3 - q1), float(arr.min()), len(arr), tuple(map(float, arr))
    )


def time_callable(
    fn: Callable[[], object], device: torch.device | str, warmup: int = 3, rounds: int = 10
) -> TimingStats:
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds ≥ 1 and warmup ≥ 0, got rounds={rounds}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    if device.type == "cuda":
        for _ in range(rounds):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return summarize(times)


def time_with_peak(
    fn: Callable[[], object], device: torch.device | str, warmup: int = 3, rounds: int = 10
) -> tuple[TimingStats, int | None]:
    """Timed as `time_callable`, and the peak allocated bytes over the timed rounds (after
    warm-up, so optimizer state and allocator growth are in it and a first-call spike is not);
    None off CUDA, where no allocator keeps a peak."""
    device = torch.device(device)
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds ≥ 1 and warmup ≥ 0, got rounds={rounds}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    stats = time_callable(fn, device, warmup=0, rounds=rounds)
    return stats, int(torch.cuda.max_memory_allocated(device)) if cuda else None


def time_sweep(
    model, seqs, phase: str, dtype: torch.dtype, batch: int, device, warmup: int = 3,
    rounds: int = 10,
) -> list[TimingStats]:
    """One model timed at every seq in turn (fresh random ids and, for training, a fresh
    optimizer per seq), for the scaling fit."""
    from muse.measure.phases import make_phase, random_ids

    out = []
    for seq in seqs:
        ids = random_ids(model.config.vocab_size, batch, seq, device, seed=seq)
        # the phase is a temporary: a CUDA graph's memory pool goes with it before the next seq
        out.append(time_callable(make_phase(phase, model, ids, dtype), device, warmup, rounds))
    return out
