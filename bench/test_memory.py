"""Peak VRAM: a batch-1 forward stays under --vram-limit-gb at every seq ≥ --vram-gate-seq; the
forward peak is recorded at every seq, and the training step's peak beside it. When no --seq
reaches the gate seq, the forward is measured at the gate seq too, so every model gets a
verdict. The gated figure is the allocator's peak; NVML's device-wide and per-process figures,
read after the run, are recorded beside it."""

import pytest

from muse.harness.plugin import muse_session_of
from muse.harness.summary import describe
from muse.measure.memory import peak_memory
from muse.measure.phases import make_phase

pytestmark = pytest.mark.gpu


def pytest_generate_tests(metafunc):
    if "gate_case" in metafunc.fixturenames:
        settings = muse_session_of(metafunc.config).settings
        gate = settings.thresholds.vram_gate_seq
        if max(settings.seqs) >= gate:
            reason = f"--seq reaches --vram-gate-seq {gate}: test_forward_peak_vram gates it"
            cases = [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="gated")]
        else:
            cases = [pytest.param(c, id=c.id) for c in
                     (settings.case(m, p, gate) for m, p in settings.models)]
        metafunc.parametrize("gate_case", cases)


def needs_cuda(case):
    if case.device.type != "cuda":
        pytest.skip("peak VRAM is read from the CUDA caching allocator: not measured on cpu")


def forward_peak_vram(case, record, thresholds):
    needs_cuda(case)
    model = case.build()
    stats = peak_memory(
        make_phase("forward", model, case.ids(model), case.torch_dtype), case.device
    )
    gated = case.seq >= thresholds.vram_gate_seq
    rec = record(
        case,
        "peak_vram_forward_bytes",
        stats.peak_allocated_bytes,
        "bytes",
        threshold=thresholds.vram_limit_gb * 1e9 if gated else None,
        comparison="<" if gated else None,
        extra={**stats.describe(), "summary": True},
    )
    weights_bytes = case.num_params() * case.torch_dtype.itemsize
    assert stats.peak_allocated_bytes >= weights_bytes, "peak below the weights' own size"
    if gated:
        assert rec.passed, describe(rec)


def test_forward_peak_vram(case, record, muse_settings):
    forward_peak_vram(case, record, muse_settings.thresholds)


def test_forward_peak_vram_at_the_gate_seq(gate_case, record, muse_settings):
    forward_peak_vram(gate_case, record, muse_settings.thresholds)


def test_train_step_peak_vram(case, record):
    needs_cuda(case)
    model = case.build()
    stats = peak_memory(
        make_phase("train_step", model, case.ids(model), case.torch_dtype), case.device
    )
    record(
        case,
        "peak_vram_train_step_bytes",
        stats.peak_allocated_bytes,
        "bytes",
        extra={**stats.describe(), "summary": True},
    )
    # fp32 weights, their gradients and AdamW's two moments are all alive during the step.
    assert stats.peak_allocated_bytes >= 16 * case.num_params(), (
        "peak below weights + grads + AdamW"
    )
