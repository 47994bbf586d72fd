"""Peak VRAM: a batch-1 forward stays under --vram-limit-gb at every seq ≥ --vram-gate-seq; the
forward peak is recorded at every seq, and the training step's peak beside it."""

import pytest

from muse.measure.memory import peak_memory
from muse.measure.phases import make_phase
from muse.summary import describe

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda(case):
    if case.device.type != "cuda":
        pytest.skip("peak VRAM is read from the CUDA caching allocator: not measured on cpu")


def test_forward_peak_vram(case, record, muse_settings):
    t = muse_settings.thresholds
    model = case.build()
    stats = peak_memory(
        make_phase("forward", model, case.ids(model), case.torch_dtype), case.device
    )
    gated = case.seq >= t.vram_gate_seq
    rec = record(
        case,
        "peak_vram_forward_bytes",
        stats.peak_allocated_bytes,
        "bytes",
        threshold=t.vram_limit_gb * 1e9 if gated else None,
        comparison="<" if gated else None,
        extra={
            "reserved_bytes": stats.peak_reserved_bytes,
            "nvml_used_bytes": stats.nvml_used_bytes,
            "summary": True,
        },
    )
    weights_bytes = case.num_params() * case.torch_dtype.itemsize
    assert stats.peak_allocated_bytes >= weights_bytes, "peak below the weights' own size"
    if gated:
        assert rec.passed, describe(rec)


def test_train_step_peak_vram(case, record):
    model = case.build()
    stats = peak_memory(
        make_phase("train_step", model, case.ids(model), case.torch_dtype), case.device
    )
    record(
        case,
        "peak_vram_train_step_bytes",
        stats.peak_allocated_bytes,
        "bytes",
        extra={
            "reserved_bytes": stats.peak_reserved_bytes,
            "nvml_used_bytes": stats.nvml_used_bytes,
            "summary": True,
        },
    )
    # fp32 weights, their gradients and AdamW's two moments are all alive during the step.
    assert stats.peak_allocated_bytes >= 16 * case.num_params(), (
        "peak below weights + grads + AdamW"
    )
