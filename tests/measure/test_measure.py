"""muse.measure on the CPU: timing statistics, the memory probe's refusal, gradient flow (against
direct autograd and a model that cannot see its context), fp16 loss scaling, causality, the
workloads, and the git facts a results file carries. No assertion is made on a timing."""

import copy
import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from muse import models
from muse.harness.results import git_facts
from muse.measure.causality import causal_leak, causal_probe, probe_positions
from muse.measure.gradient import backward_probe, gradient_flow, position_buckets
from muse.measure.memory import NVMLMemory, nvml_memory, peak_memory
from muse.measure.phases import (
    TrainStep,
    fixed_tokens_batch,
    fixed_tokens_step,
    lm_loss,
    random_ids,
    torch_dtype,
)
from muse.measure.timing import summarize, time_callable, time_with_peak

VOCAB = 97


def tiny_transformer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("transformer", "tiny", vocab_size=VOCAB)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all()
    return float((actual - expected).norm() / expected.norm())


@dataclasses.dataclass
class ToyConfig:
    vocab_size: int = VOCAB
    d_model: int = 16


class PerTokenLM(nn.Module):
    """Ignores its context: the logits at t are a function of token t alone."""

    def __init__(self, config: ToyConfig | None = None):
        super().__init__()
        self.config = config = config or ToyConfig()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(config.d_model, 32), nn.GELU(), nn.Linear(32, config.d_model))
            for _ in range(2)
        )
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class PeekingLM(PerTokenLM):
    """Leaks: the logits at t are computed from token t+1 (the last position wraps to 0)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids.roll(-1, dims=1))


# -- timing ----------------------------------------------------------------------------------


def test_summarize_gives_numpy_median_and_iqr():
    times = [0.5, 0.1, 0.4, 0.2, 0.3, 10.0, 0.25]
    stats = summarize(times)
    q1, q3 = np.percentile(times, [25, 75])
    assert stats.median_s == np.median(times) == 0.3
    assert stats.iqr_s == pytest.approx(q3 - q1, rel=1e-15)
    assert stats.iqr_s == pytest.approx(0.45 - 0.225, rel=1e-12)  # linear interpolation
    assert stats.min_s == 0.1
    assert stats.rounds == 7
    assert stats.times_s == tuple(times)


@pytest.mark.parametrize("warmup, rounds", [(0, 1), (3, 10), (2, 5)])
def test_time_callable_calls_warmup_plus_rounds_times(warmup, rounds):
    calls = []
    stats = time_callable(lambda: calls.append(1), "cpu", warmup=warmup, rounds=rounds)
    assert len(calls) == warmup + rounds
    assert stats.rounds == rounds == len(stats.times_s)
    assert all(t >= 0 for t in stats.times_s)


@pytest.mark.parametrize("warmup, rounds", [(3, 0), (-1, 10)])
def test_time_callable_rejects_bad_counts(warmup, rounds):
    calls = []
    with pytest.raises(ValueError, match="rounds"):
        time_callable(lambda: calls.append(1), "cpu", warmup=warmup, rounds=rounds)
    assert not calls


# -- memory ----------------------------------------------------------------------------------


def test_peak_memory_refuses_the_cpu_by_name():
    calls = []
    with pytest.raises(ValueError, match="cpu"):
        peak_memory(lambda: calls.append(1), "cpu")
    assert not calls


# -- gradient flow ---------------------------------------------------------------------------


def test_gradient_flow_sees_no_long_range_signal_in_a_context_free_model():
    torch.manual_seed(0)
    model = PerTokenLM()
    flow = gradient_flow(model, random_ids(VOCAB, 2, 64, "cpu", seed=1))
    assert flow.finite
    # The parameter gradient of layer 0 is non-zero (the last token's own path)...
    assert flow.first_layer_grad_norm > 0
    assert len(flow.layer_grad_norms) == 2 and all(g > 0 for g in flow.layer_grad_norms)
    # ...but nothing before the last position reaches the loss: exactly zero, not small.
    assert flow.long_range_grad_norm == 0.0
    assert all(b.max_grad_norm == 0.0 for b in flow.buckets[:-1])
    assert flow.buckets[-1].max_grad_norm > 0


@pytest.mark.parametrize(
    "model_fn", [tiny_transformer, PerTokenLM], ids=["transformer", "per-token"]
)
def test_gradient_flow_is_per_sequence(model_fn):
    # The same sequence repeated B times must read the same: a batch-mean loss gives each
    # sequence 1/B of the gradient, which made the long-range metric shrink as 1/B.
    torch.manual_seed(0)
    model = model_fn()
    seq = random_ids(VOCAB, 1, 64, "cpu", seed=1)
    flows = [gradient_flow(copy.deepcopy(model), seq.expand(b, -1).contiguous()) for b in (1, 2, 4)]
    one = flows[0]
    assert one.finite and one.first_layer_grad_norm > 0
    for flow in flows[1:]:  # float32; only the order of batched sums may differ
        assert flow.loss == pytest.approx(one.loss, rel=1e-5)
        assert flow.long_range_grad_norm == pytest.approx(one.long_range_grad_norm, rel=1e-5)
        for b, b1 in zip(flow.buckets, one.buckets, strict=True):
            assert b.mean_grad_norm == pytest.approx(b1.mean_grad_norm, rel=1e-5, abs=1e-12)
            assert b.max_grad_norm == pytest.approx(b1.max_grad_norm, rel=1e-5, abs=1e-12)
        assert flow.layer_grad_norms == pytest.approx(one.layer_grad_norms, rel=1e-5)


def direct_h0_grad_norms(model: nn.Module, ids: torch.Tensor, target: torch.Tensor):
    """Per-sequence ‖∂ℓ_b/∂h₀[b, t]‖ (ℓ_b: sequence b's last-token loss), averaged over the
    batch, with h₀ made a leaf by swapping embed's output."""
    leaf = {}

    def swap(_module, _inputs, output):
        leaf["h0"] = output.detach().requires_grad_()
        return leaf["h0"]

    handle = model.embed.register_forward_hook(swap)
    try:
        loss = F.cross_entropy(model(ids)[:, -1], target, reduction="sum")
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(loss, leaf["h0"])
    return grad.norm(dim=-1).mean(dim=0)


def test_gradient_flow_matches_direct_autograd_for_the_transformer():
    model = tiny_transformer().double()
    ids = random_ids(VOCAB, 2, 64, "cpu", seed=1)
    reference64 = copy.deepcopy(model)
    flow = gradient_flow(model, ids, seed=0)
    # gradient_flow runs the model in float32 (fp32 master weights; the cast is in place).
    assert next(model.parameters()).dtype == torch.float32
    assert flow.finite and flow.loss_scale == 1.0
    assert flow.long_range_grad_norm > 0

    # The same target gradient_flow draws from its seed, one token for every sequence.
    target = torch.randint(0, VOCAB, (1,), generator=torch.Generator().manual_seed(0)).expand(2)
    per_position32 = direct_h0_grad_norms(model, ids, target)
    per_position64 = direct_h0_grad_norms(reference64, ids, target)
    assert len(flow.buckets) == 8 and flow.buckets[0].stop == 8
    # float32 vs float32: the same operations, only summation order may differ.
    assert flow.long_range_grad_norm == pytest.approx(float(per_position32[:8].mean()), rel=1e-6)
    for bucket in flow.buckets:
        chunk = per_position32[bucket.start : bucket.stop]
        assert bucket.mean_grad_norm == pytest.approx(float(chunk.mean()), rel=1e-6)
        assert bucket.max_grad_norm == pytest.approx(float(chunk.max()), rel=1e-6)
    # float32 vs the float64 model: float32 rounding through two layers, well inside 1e-4.
    assert flow.long_range_grad_norm == pytest.approx(float(per_position64[:8].mean()), rel=1e-4)


@pytest.mark.parametrize("n", [1, 7, 64], ids=lambda n: f"N{n}")
def test_position_buckets_partition_the_positions(n):
    per_position = torch.rand(n, generator=torch.Generator().manual_seed(n))
    buckets = position_buckets(per_position, 8)
    assert len(buckets) == min(n, 8)
    assert buckets[0].start == 0 and buckets[-1].stop == n
    for a, b in zip(buckets[:-1], buckets[1:], strict=True):
        assert a.stop == b.start
    for b in buckets:
        assert b.stop > b.start
        chunk = per_position[b.start : b.stop]
        assert b.mean_grad_norm == pytest.approx(float(chunk.mean()), rel=1e-6)
        assert b.max_grad_norm == float(chunk.max())


def _cpu_fp16_autocast_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = nn.Linear(4, 4)(torch.randn(2, 4))
    except (RuntimeError, AssertionError):
        return False
    return out.dtype == torch.float16


needs_cpu_fp16 = pytest.mark.skipif(
    not _cpu_fp16_autocast_works(), reason="this torch build has no fp16 autocast on the CPU"
)


def _is_power_of_two(x: float) -> bool:
    mantissa, _ = np.frexp(x)
    return x > 0 and mantissa == 0.5


@needs_cpu_fp16
def test_fp16_backward_probe_scales_and_unscales_the_gradients():
    model16, model32 = tiny_transformer(), tiny_transformer()
    ids = random_ids(VOCAB, 2, 33, "cpu", seed=1)
    probe16 = backward_probe(model16, ids, torch.float16, lm_loss)
    probe32 = backward_probe(model32, ids, torch.float32, lm_loss)
    assert probe32.loss_scale == 1.0
    assert _is_power_of_two(probe16.loss_scale) and probe16.loss_scale <= 2**16
    assert probe16.finite and not probe16.nonfinite_params
    # fp16 matmuls carry ~1e-3 relative error (observed ≤ 1e-3 here); the scale, if not
    # divided out, would be off by a factor of up to 65536.
    assert probe16.loss == pytest.approx(probe32.loss, rel=1e-3)
    assert rel_err(probe16.h0_grad, probe32.h0_grad) <= 1e-2
    grads32 = dict(model32.named_parameters())
    for name, p in model16.named_parameters():
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, grads32[name].grad) <= 1e-2, name


@needs_cpu_fp16
def test_fp16_backward_probe_halves_the_scale_on_overflow():
    torch.manual_seed(0)
    model16 = PerTokenLM()
    model32 = copy.deepcopy(model16)
    ids = random_ids(VOCAB, 2, 16, "cpu", seed=1)

    def big_loss(logits, _ids):
        # ∂loss/∂logits = 8·scale: 2¹⁹ at the starting scale, above fp16's 65504.
        return 8.0 * logits.float().sum()

    probe16 = backward_probe(model16, ids, torch.float16, big_loss)
    probe32 = backward_probe(model32, ids, torch.float32, big_loss)
    assert probe16.finite
    assert _is_power_of_two(probe16.loss_scale) and probe16.loss_scale <= 2**12
    assert probe32.loss_scale == 1.0
    assert rel_err(probe16.h0_grad, probe32.h0_grad) <= 1e-2
    grads32 = dict(model32.named_parameters())
    for name, p in model16.named_parameters():
        assert rel_err(p.grad, grads32[name].grad) <= 1e-2, name


# -- causality -------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 16, 31])
def test_causal_leak_finds_a_model_reading_the_next_token(t):
    torch.manual_seed(0)
    model = PeekingLM().double()
    assert causal_leak(model, random_ids(VOCAB, 2, 33, "cpu", seed=1), t) > 1e-3


def test_causal_probe_times_are_spread_and_inside_the_sequence():
    assert probe_positions(2) == (0,)
    assert probe_positions(3) == (0, 1)
    assert probe_positions(4096) == (0, 1365, 2048, 4094)


def test_causal_probe_finds_a_peeking_model_above_its_rerun_noise():
    torch.manual_seed(0)
    probe = causal_probe(PeekingLM().double(), random_ids(VOCAB, 2, 33, "cpu", seed=1))
    assert probe.positions == (0, 11, 16, 31)
    assert probe.rerun_noise == 0.0
    assert probe.leak > 1e-3 and not probe.causal
    assert set(probe.leaks) == set(probe.positions) and max(probe.leaks.values()) == probe.leak


def test_causal_probe_of_the_transformer_is_exactly_causal():
    probe = causal_probe(tiny_transformer().eval(), random_ids(VOCAB, 2, 33, "cpu", seed=1))
    assert (probe.leak, probe.rerun_noise, probe.causal) == (0.0, 0.0, True)


def test_causal_probe_refuses_a_sequence_without_a_future():
    with pytest.raises(ValueError, match="needs a sequence of ≥ 2 tokens, got 1"):
        causal_probe(tiny_transformer(), random_ids(VOCAB, 1, 1, "cpu"))


@pytest.mark.parametrize("t", [0, 16, 31])
def test_causal_leak_of_the_transformer_is_zero(t):
    model = tiny_transformer().double().eval()
    assert causal_leak(model, random_ids(VOCAB, 2, 33, "cpu", seed=1), t) == 0.0


@pytest.mark.parametrize("t", [-1, 32, 33])
def test_causal_leak_rejects_t_outside_the_sequence(t):
    model = PerTokenLM()
    with pytest.raises(ValueError, match="t must be in"):
        causal_leak(model, random_ids(VOCAB, 2, 33, "cpu"), t)


# -- workloads -------------------------------------------------------------------------------


def test_random_ids_are_seeded_varied_and_in_range():
    a = random_ids(VOCAB, 3, 200, "cpu", seed=7)
    assert a.dtype == torch.long and a.shape == (3, 200)
    assert torch.equal(a, random_ids(VOCAB, 3, 200, "cpu", seed=7))
    assert not torch.equal(a, random_ids(VOCAB, 3, 200, "cpu", seed=8))
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB
    assert a.unique().numel() > VOCAB // 2


def test_torch_dtype_names_the_valid_dtypes():
    assert torch_dtype("fp16") is torch.float16
    assert torch_dtype("bf16") is torch.bfloat16
    assert torch_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="fp8") as err:
        torch_dtype("fp8")
    for valid in ("fp16", "bf16", "fp32"):
        assert valid in str(err.value)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.bfloat16, pytest.param(torch.float16, marks=needs_cpu_fp16)],
    ids=["fp32", "bf16", "fp16"],
)
def test_train_step_updates_the_weights_and_keeps_a_finite_loss(dtype):
    model = tiny_transformer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = TrainStep(model, random_ids(VOCAB, 2, 33, "cpu", seed=1), dtype, lr=1e-2)
    assert step.last_loss is None
    losses = []
    for _ in range(4):
        step()
        losses.append(float(step.last_loss))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # the same batch four times: the loss goes down
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == list(before)
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step


@pytest.mark.parametrize(("tokens", "seq", "batch"),
                         [(65536, 4096, 16), (65536, 3000, 21), (65536, 65536, 1), (8, 1, 8)])
def test_fixed_tokens_batch_is_the_whole_sequences_that_fit(tokens, seq, batch):
    assert fixed_tokens_batch(tokens, seq) == batch


def test_fixed_tokens_batch_names_a_seq_longer_than_a_step():
    with pytest.raises(ValueError, match="seq 1024 is longer than the 512 tokens of a step; "
                                         "--tokens-per-step must be at least 1024"):
        fixed_tokens_batch(512, 1024)


def test_fixed_tokens_step_trains_every_position_in_bf16():
    """The protocol's step: batch = tokens // seq, bf16 autocast over fp32 weights, and a loss
    over every next-token position — checked against a float64 reference on a model whose
    logits sharpen with the position, so the last position alone would not pass."""

    class Sharpening(PerTokenLM):
        def forward(self, ids):
            t = torch.arange(1, ids.shape[1] + 1, dtype=torch.float64) / ids.shape[1]
            return super().forward(ids) * (20 * t).to(self.head.weight.dtype)[:, None]

    torch.manual_seed(0)
    model = Sharpening()
    reference = copy.deepcopy(model).double()
    step = fixed_tokens_step(model, 256, 64, "cpu")
    assert step.ids.shape == (4, 64) and step.dtype == torch.bfloat16
    assert not step.fused and not step.optimizer.defaults.get("fused")  # torch fuses on CUDA
    with torch.no_grad():
        per_position = F.cross_entropy(reference(step.ids)[:, :-1].transpose(1, 2),
                                       step.ids[:, 1:], reduction="none")
    step()
    full, last = per_position.mean().item(), per_position[:, -1].mean().item()
    assert abs(last / full - 1) > 0.1  # the two readings are told apart here
    assert float(step.last_loss) == pytest.approx(full, rel=2e-2)  # bf16 logits
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize(("warmup", "rounds"), [(0, 1), (3, 10)])
def test_time_with_peak_times_the_rounds_after_warmup(warmup, rounds):
    calls = []
    stats, peak = time_with_peak(lambda: calls.append(1), "cpu", warmup=warmup, rounds=rounds)
    assert len(calls) == warmup + rounds and stats.rounds == rounds
    assert peak is None  # no allocator peak off CUDA
    with pytest.raises(ValueError, match="need rounds ≥ 1"):
        time_with_peak(lambda: None, "cpu", rounds=0)


# -- git facts -------------------------------------------------------------------------------


@pytest.fixture
def outside_git(tmp_path, monkeypatch):
    for var in ("GIT_DIR", "GIT_WORK_TREE", "MUSE_GIT_SHA", "MUSE_GIT_DIRTY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    probe = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True)
    assert probe.returncode != 0, "tmp_path unexpectedly lies inside a git repository"
    return tmp_path


@pytest.mark.parametrize(
    "dirty_env, dirty", [("1", True), ("true", True), ("0", False), ("no", False)]
)
def test_git_facts_come_from_the_environment_outside_a_repository(
    outside_git, monkeypatch, dirty_env, dirty
):
    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("MUSE_GIT_SHA", sha)
    monkeypatch.setenv("MUSE_GIT_DIRTY", dirty_env)
    assert git_facts(cwd=outside_git) == {"sha": sha, "dirty": dirty}


def test_git_facts_are_unknown_without_a_repository_or_environment(outside_git):
    assert git_facts(cwd=outside_git) == {"sha": None, "dirty": None}


def test_the_copiers_word_beats_a_stale_git_inside_a_repository(monkeypatch):
    # a GPU runner's copy of the tree can carry an old .git: the commit it was told wins
    monkeypatch.setenv("MUSE_GIT_SHA", "c68a68c")
    monkeypatch.setenv("MUSE_GIT_DIRTY", "0")
    assert git_facts() == {"sha": "c68a68c", "dirty": False}


# -- NVML: what its figures are ----------------------------------------------------------------


class FakeNVML:
    """pynvml's calls as used by nvml_memory: 40 GB used on the device, 3 GB of it ours."""

    class NVMLError(Exception):
        pass

    def __init__(self, processes):
        self.processes = processes

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        assert index == 0
        return "handle"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=40_000_000_000, total=141_000_000_000)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self.processes


def test_nvml_reports_the_device_and_this_process_apart(monkeypatch):
    ours = SimpleNamespace(pid=os.getpid(), usedGpuMemory=3_000_000_000)
    other = SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=37_000_000_000)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([other, ours]))
    reading = nvml_memory(torch.device("cuda", 0))
    assert reading == NVMLMemory(device_used_bytes=40_000_000_000, process_bytes=3_000_000_000)


def test_nvml_process_figure_is_none_when_this_pid_is_not_listed(monkeypatch):
    # In a container NVML lists host pids: ours may not appear, and no other figure stands in.
    other = SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=37_000_000_000)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([other]))
    reading = nvml_memory(torch.device("cuda", 0))
    assert reading == NVMLMemory(device_used_bytes=40_000_000_000, process_bytes=None)


def test_nvml_absent_reads_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert nvml_memory(torch.device("cuda", 0)) is None


def test_fixed_tokens_step_with_the_chunked_loss_takes_the_same_step():
    torch.manual_seed(0)
    model = models.build("transformer", "tiny", vocab_size=VOCAB)
    twin = copy.deepcopy(model)
    full = fixed_tokens_step(model, 256, 64, "cpu")
    chunked = fixed_tokens_step(twin, 256, 64, "cpu", loss_chunk=50)
    assert chunked.loss_chunk == 50 and torch.equal(full.ids, chunked.ids)
    full()
    chunked()
    # bf16 autocast: the two sum the loss in different orders (their gradients are checked
    # equal in float64 by tests/models/test_contract.py)
    assert torch.allclose(full.last_loss, chunked.last_loss, rtol=1e-3, atol=0)
