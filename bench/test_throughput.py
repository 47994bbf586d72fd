"""Tokens/s of the forward and the training step at --batch through pytest-benchmark (so
`--benchmark-compare` tracks it across commits), with peak memory in `extra_info`, and the
speed ratio to the `transformer` of matched size (gated only when --min-speedup is given).

Beside it, training as people train (muse.measure.phases.FIXED_STEP_PROTOCOL): a fixed number of
tokens per step (--tokens-per-step, batch = tokens // seq), bf16 autocast, fused AdamW, the same
for every model; tokens/s, the step's peak memory and the ratio to the matched transformer
measured in the same run."""

import math
import traceback
from dataclasses import dataclass, replace

import pytest
import torch
from torch._dynamo.exc import TorchDynamoException

from muse import models
from muse.harness.summary import describe
from muse.measure.graphs import GraphCaptureError
from muse.measure.memory import free_device_memory
from muse.measure.phases import (
    FIXED_STEP_DTYPE,
    FIXED_STEP_PROTOCOL,
    PHASES,
    dynamo_graphs,
    fixed_tokens_step,
    make_phase,
    synchronize,
)
from muse.measure.timing import TimingStats, time_callable, time_with_peak

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


@dataclass(frozen=True)
class FixedStep:
    batch: int
    seq: int
    stats: TimingStats
    peak_bytes: int | None  # None off CUDA
    loss: float
    graphs: int | None = None  # compiled: the graphs torch.compile made of the model

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq / self.stats.median_s


def fixed_step(case, tokens_per_step: int, cache: dict, loss_chunk: int = 0,
               graphed: bool = False, compiled: str | None = None) -> FixedStep:
    """`case`'s model under the fixed-tokens protocol (`graphed`: captured in a CUDA graph;
    `compiled`: under torch.compile with that backend), measured once per session and seq: a
    baseline's figures serve every model matched to it, and its own test."""
    key = ("fixed_step", case.spec, case.seq, tokens_per_step, loss_chunk, graphed, compiled)
    if key not in cache:
        if compiled:  # a fresh trace: no earlier model's compiles near dynamo's recompile limit
            torch._dynamo.reset()
        graphs_before = dynamo_graphs()
        step = fixed_tokens_step(case.build(), tokens_per_step, case.seq, case.device,
                                 loss_chunk, graphed, compiled)
        stats, peak = time_with_peak(step, case.device, WARMUP, ROUNDS)
        if graphed and peak is not None:  # replays reuse the pool that capture filled
            peak = max(peak, step.capture_peak_bytes)
        graphs = dynamo_graphs() - graphs_before if compiled else None
        cache[key] = FixedStep(step.ids.shape[0], case.seq, stats, peak, step.last_loss.item(),
                               graphs)
        del step
        free_device_memory()
    return cache[key]


def record_step(at, prefix: str, own: FixedStep, facts: dict, record):
    """`<prefix>_tokens_per_s` and `<prefix>_peak_bytes` of a measured step; fails the test
    when the step did not train or measured nothing."""
    rec = record(at, f"{prefix}_tokens_per_s", own.tokens_per_s, "tokens/s",
                 extra={**facts, "summary": True})
    if own.peak_bytes is not None:
        record(at, f"{prefix}_peak_bytes", own.peak_bytes, "bytes", extra=facts)
    assert math.isfinite(own.loss), f"the training loss is {own.loss}: the step is not training"
    assert math.isfinite(rec.value) and rec.value > 0, describe(rec)


def record_ratio_to_baseline(case, at, prefix: str, own: FixedStep, tokens: int, cache: dict,
                             chunk: int, record, **variant) -> None:
    """`<prefix>_speedup_vs_transformer`: against the matched transformer measured the same way
    (`variant`: fixed_step's graphed or compiled). The baseline's own limit (out of memory, a
    step a graph cannot hold, a compile that fails) leaves the ratio INCONCLUSIVE; it never
    fails the model."""
    base_name, base_preset = models.baseline_for(case.model, case.preset)
    if (base_name, base_preset) == (case.model, case.preset):
        return  # the baseline itself: its ratio is 1 by definition
    metric = f"{prefix}_speedup_vs_{base_name}"
    base_spec = f"{base_name}:{base_preset}"
    try:
        base = fixed_step(replace(case, model=base_name, preset=base_preset), tokens, cache,
                          chunk, **variant)
    except (torch.OutOfMemoryError, GraphCaptureError, TorchDynamoException) as exc:
        message = str(exc).splitlines()[0]
        why = (f"{base_spec} ran out of memory: {message}"
               if isinstance(exc, torch.OutOfMemoryError) else f"{base_spec}: {message}")
        traceback.clear_frames(exc.__traceback__)
        free_device_memory()
        record(at, metric, None, "1", status="INCONCLUSIVE",
               extra={"baseline": base_spec, "why": why})
        return
    record(at, metric, own.tokens_per_s / base.tokens_per_s, "1", extra={
        "baseline": base_spec, "baseline_tokens_per_s": base.tokens_per_s,
        "peak_bytes": own.peak_bytes, "baseline_peak_bytes": base.peak_bytes,
        "tokens_per_step": own.batch * own.seq, "loss_chunk": chunk, "summary": True})


def step_tokens(case, budget: str, pytestconfig) -> int:
    """The tokens a step trains on under `budget`; skips a seq longer than --tokens-per-step."""
    if budget == "batch":
        return case.batch * case.seq
    tokens = pytestconfig.getoption("tokens_per_step")
    if case.seq > tokens:
        pytest.skip(f"seq {case.seq} is longer than --tokens-per-step {tokens}: no whole "
                    "sequence fits a step")
    return tokens


# a step's two budgets: --tokens-per-step (batch = tokens // seq), and --batch sequences (the
# batch-1 protocol by default, where launch overhead weighs most)
FIXED_BUDGETS = {"tokens_per_step": "fixed_step", "batch": "fixed_batch_step"}


@pytest.mark.parametrize("budget", FIXED_BUDGETS)
def test_train_step_at_fixed_tokens_per_step(case, budget, record, muse_session, pytestconfig):
    """The step as people train (bf16 autocast, fused AdamW, --loss-chunk) at `budget`'s tokens:
    tokens/s, peak memory and the ratio to the matched transformer stepped the same way."""
    tokens = step_tokens(case, budget, pytestconfig)
    prefix = FIXED_BUDGETS[budget]
    chunk, cache = pytestconfig.getoption("loss_chunk"), muse_session.cache
    own = fixed_step(case, tokens, cache, chunk)
    at = replace(case, batch=own.batch, dtype=FIXED_STEP_DTYPE)
    facts = {"protocol": FIXED_STEP_PROTOCOL, "tokens_per_step": own.batch * own.seq,
             "loss_chunk": chunk,
             "median_s": own.stats.median_s, "iqr_s": own.stats.iqr_s,
             "rounds": own.stats.rounds, "loss": own.loss}
    record_step(at, prefix, own, facts, record)
    record_ratio_to_baseline(case, at, prefix, own, tokens, cache, chunk, record)


def measure_variant(case, tokens: int, prefix: str, gain: str, how: str, record, muse_session,
                    pytestconfig, **variant) -> None:
    """The fixed-tokens step at `tokens` a step as `variant` (fixed_step's graphed or
    compiled): `<prefix>_tokens_per_s` and its peak, `<gain>` over the same step launched op by
    op, and the ratio to the matched transformer run the same way. A variant the model cannot
    run fails the test with the reason."""
    chunk, cache = pytestconfig.getoption("loss_chunk"), muse_session.cache
    eager = fixed_step(case, tokens, cache, chunk)
    try:
        own = fixed_step(case, tokens, cache, chunk, **variant)
    except (GraphCaptureError, TorchDynamoException) as exc:
        pytest.fail(f"{how}: {str(exc).strip().splitlines()[0]}", pytrace=False)
    at = replace(case, batch=own.batch, dtype=FIXED_STEP_DTYPE)
    facts = {"protocol": f"{FIXED_STEP_PROTOCOL}, {how}",
             "tokens_per_step": own.batch * own.seq, "loss_chunk": chunk,
             "median_s": own.stats.median_s, "iqr_s": own.stats.iqr_s,
             "rounds": own.stats.rounds, "loss": own.loss}
    if own.graphs is not None:
        if own.graphs == 0:
            pytest.fail(f"{how}: torch.compile made no graph, so the step ran uncompiled",
                        pytrace=False)
        facts["graphs"] = own.graphs
    record_step(at, prefix, own, facts, record)
    if own.graphs is not None:  # 1 is the whole step; more, pieces with eager code between
        record(at, f"{prefix}_graphs", own.graphs, "graphs", extra={**facts, "summary": True})
    record(at, gain, own.tokens_per_s / eager.tokens_per_s, "1",
           extra={"eager_tokens_per_s": eager.tokens_per_s, "summary": True})
    record_ratio_to_baseline(case, at, prefix, own, tokens, cache, chunk, record, **variant)


GRAPHED_BUDGETS = {"tokens_per_step": ("graphed_step", "cuda_graph_gain"),
                   "batch": ("graphed_batch_step", "batch_cuda_graph_gain")}


@pytest.mark.parametrize("budget", GRAPHED_BUDGETS)
def test_train_step_captured_in_a_cuda_graph(case, budget, record, muse_session, pytestconfig):
    """With --cuda-graphs: the step replayed from a CUDA graph, its gain over the same step
    launched op by op, and its ratio to the matched transformer's graphed step."""
    if not pytestconfig.getoption("cuda_graphs"):
        pytest.skip("--cuda-graphs not given: the captured step is not measured")
    if case.device.type != "cuda":
        pytest.skip(f"a CUDA graph needs CUDA; this run is on {case.device}")
    measure_variant(case, step_tokens(case, budget, pytestconfig), *GRAPHED_BUDGETS[budget],
                    "captured in a CUDA graph", record, muse_session, pytestconfig, graphed=True)


COMPILED_BUDGETS = {"tokens_per_step": ("compiled_step", "compile_gain"),
                    "batch": ("compiled_batch_step", "batch_compile_gain")}


@pytest.mark.parametrize("budget", COMPILED_BUDGETS)
def test_train_step_compiled(case, budget, record, muse_session, pytestconfig):
    """With --compile BACKEND: the fixed-tokens step with the model under torch.compile (every
    model and its matched transformer alike), its gain over the same step uncompiled, and its
    ratio to the matched transformer's compiled step. Compiling is not timed (warm-up)."""
    backend = pytestconfig.getoption("compile")
    if backend is None:
        pytest.skip("--compile not given: the compiled step is not measured")
    measure_variant(case, step_tokens(case, budget, pytestconfig), *COMPILED_BUDGETS[budget],
                    f"the model under torch.compile (backend {backend})",
                    record, muse_session, pytestconfig, compiled=backend)
