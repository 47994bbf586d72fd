"""Where a training step's (or a forward's) device time goes: `muse profile MODEL --seq N`.

Two views of the same profiled steps. Sublayers: every module inside a block is wrapped in a
profiler range named after its class (`muse::BKMixer`, …), and each kind of sublayer's forward
is summed over the blocks twice over: `[kernels]`, the device time of the kernels it launched,
and on CUDA `[span]`, how long its range lasted on the GPU's timeline. A span far above its
kernel time is a GPU waiting for the host to launch the next op: launch-bound. Kernels: the
kernels (and the ops that launched them on the CPU) with the most self time, forward and
backward together, as a share of the step's median time from CUDA events. The question it
answers is the one a missed speed goal asks: what dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from muse.measure.phases import (
    TrainStep,
    compile_once,
    fixed_tokens_step,
    forward_fn,
    random_ids,
    synchronize,
)
from muse.measure.timing import time_callable

PHASES = ("train", "forward")
UNLABELLED = (nn.LayerNorm, nn.Dropout)  # cheap, and too many ranges blur the picture


@dataclass(frozen=True)
class Row:
    name: str
    calls: int
    time_ms: float  # per step
    share: float  # of the median step time


def _label_sublayers(model: nn.Module) -> list:
    """Profiler ranges around the children of every block, and around embed/head modules."""
    handles, stack = [], []

    def enter(label):
        def pre(_module, _args):
            rf = record_function(label)
            rf.__enter__()
            stack.append(rf)

        return pre

    def leave(_module, _args, _out):
        stack.pop().__exit__(None, None, None)

    targets = []
    blocks = getattr(model, "blocks", None)
    if blocks is not None:
        for block in blocks:
            targets += [m for m in block.children() if not isinstance(m, UNLABELLED)]
    embed = getattr(model, "embed", None)
    if embed is not None:
        targets.append(embed)
    for m in targets:
        handles.append(m.register_forward_pre_hook(enter(f"muse::{type(m).__name__}")))
        handles.append(m.register_forward_hook(leave))
    return handles


def profile_step(model: nn.Module, seq: int, *, phase: str = "train", dtype=torch.float16,
                 batch: int = 1, device="cuda", steps: int = 3, warmup: int = 3,
                 tokens_per_step: int | None = None, loss_chunk: int = 0,
                 compiled: str | None = None):
    """→ (median step seconds, sublayer rows, kernel rows), times per step. `tokens_per_step`:
    the bench's fixed-tokens train step instead (muse.measure.phases.fixed_tokens_step: bf16,
    fused AdamW, batch = tokens_per_step // seq; `dtype` and `batch` unused), with `loss_chunk`;
    `compiled`: the model under torch.compile with that backend, whose fused kernels carry no
    sublayer labels (the sublayer rows are then empty)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if tokens_per_step is not None and phase != "train":
        raise ValueError(f"the fixed-tokens step is a train step, not phase {phase!r}")
    device = torch.device(device)
    model = model.to(device)
    if tokens_per_step is not None:
        fn = fixed_tokens_step(model, tokens_per_step, seq, device, loss_chunk,
                               compiled=compiled)
    else:
        ids = random_ids(model.config.vocab_size, batch, seq, device)
        run = compile_once(model, compiled) if compiled else model
        fn = (TrainStep(run, ids, dtype, loss_chunk=loss_chunk) if phase == "train"
              else forward_fn(run, ids, dtype))
    step_s = time_callable(fn, device, warmup=warmup, rounds=max(steps, 5)).median_s
    # hooks added to a compiled model would only force it to compile again
    handles = [] if compiled else _label_sublayers(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            synchronize(device)
    finally:
        for h in handles:
            h.remove()
    on_device = device.type == "cuda"

    def label(e):
        if not e.key.startswith("muse::"):
            return e.key
        # the profiler keeps a user range twice: on the host (with its kernels' device time)
        # and as an annotation on the GPU timeline (its span)
        return e.key + (" [span]" if e.device_type == DeviceType.CUDA else " [kernels]")

    def rows(events, total_attr):
        out = [Row(label(e), e.count // steps, getattr(e, total_attr) / 1e3 / steps, 0.0)
               for e in events]
        return [Row(r.name, r.calls, r.time_ms, r.time_ms / (step_s * 1e3)) for r in out]

    events = prof.key_averages()
    sub = [e for e in events if e.key.startswith("muse::")]
    total = "device_time_total" if on_device else "cpu_time_total"
    self_total = "self_device_time_total" if on_device else "self_cpu_time_total"
    sublayers = sorted(rows(sub, total), key=lambda r: -r.time_ms)
    kernels = sorted(rows([e for e in events if not e.key.startswith("muse::")], self_total),
                     key=lambda r: -r.time_ms)
    return step_s, sublayers, once_by_name([r for r in kernels if r.time_ms > 0])


def once_by_name(rows: list[Row]) -> list[Row]:
    """The first row of each name: a Triton kernel is listed twice, as the host op that
    launched it and as the kernel itself, with the same device time."""
    seen: set[str] = set()
    return [r for r in rows if not (r.name in seen or seen.add(r.name))]


def format_rows(title: str, rows: list[Row], limit: int) -> list[str]:
    lines = [title, f"{'ms/step':>9} {'share':>6} {'calls':>6}  name"]
    for r in rows[:limit]:
        name = r.name if len(r.name) <= 90 else r.name[:87] + "..."
        lines.append(f"{r.time_ms:9.3f} {r.share:6.1%} {r.calls:6d}  {name}")
    return lines
