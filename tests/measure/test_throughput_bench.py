"""bench/test_throughput.py's tokens-per-step protocol, run in inner sessions on the CPU with tiny
models and a small step: what it records, that the baseline is measured once in the run and
shared, and that a seq longer than a step is skipped with the reason. No timing is asserted."""

import json
import shutil
from pathlib import Path

import pytest

import muse.harness.results

muse.harness.results.environment_facts()  # see tests/harness/test_plugin.py: triton once, here

REPO = Path(__file__).resolve().parents[2]


def run_protocol(pytester, *models, tokens="128", budget="not batch"):
    shutil.copy(REPO / "bench" / "test_throughput.py", pytester.path / "test_throughput.py")
    result = pytester.runpytest("-p", "no:cacheprovider", "-k",
                                f"fixed_tokens_per_step and {budget}",
                                "-rs", "--results", str(pytester.path / "results"),
                                "--device", "cpu", "--seq", "64", "256", "--model", *models,
                                "--tokens-per-step", tokens)
    records = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    return result, records


def test_the_protocol_records_tokens_per_s_and_the_ratio_to_its_transformer(pytester):
    result, records = run_protocol(pytester, "transformer:tiny", "phase2:tiny")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(["*seq 256 is longer than --tokens-per-step 128*"])
    got = {(r["model"], r["metric"]): r for r in records}
    assert set(got) == {("transformer", "fixed_step_tokens_per_s"),
                        ("phase2", "fixed_step_tokens_per_s"),
                        ("phase2", "fixed_step_speedup_vs_transformer")}  # no peak off CUDA
    for r in records:
        # batch = 128 tokens // seq 64, in bf16 whatever --dtype and --batch say
        assert (r["seq"], r["batch"], r["dtype"], r["device"]) == (64, 2, "bf16", "cpu")
        assert r["status"] == "RECORDED" and r["threshold"] is None
    own = got["phase2", "fixed_step_tokens_per_s"]
    assert own["extra"]["tokens_per_step"] == 128 and own["extra"]["rounds"] == 10
    assert own["value"] == pytest.approx(128 / own["extra"]["median_s"])
    assert "fused on CUDA" in own["extra"]["protocol"]
    ratio = got["phase2", "fixed_step_speedup_vs_transformer"]
    base = got["transformer", "fixed_step_tokens_per_s"]
    # the baseline measured once in the run: its own record and the ratio's denominator agree
    assert ratio["extra"]["baseline"] == "transformer:tiny"
    assert ratio["extra"]["baseline_tokens_per_s"] == base["value"]
    assert ratio["value"] == pytest.approx(own["value"] / base["value"])


def test_the_batch_budget_steps_batch_sequences_at_every_seq(pytester):
    result, records = run_protocol(pytester, "transformer:tiny", "phase2:tiny", budget="batch")
    result.assert_outcomes(passed=4)  # no seq is too long for a step of --batch sequences
    got = {(r["model"], r["seq"], r["metric"]): r for r in records}
    assert {m for _, _, m in got} == {"fixed_batch_step_tokens_per_s",
                                      "fixed_batch_step_speedup_vs_transformer"}
    for seq in (64, 256):
        own = got["phase2", seq, "fixed_batch_step_tokens_per_s"]
        ratio = got["phase2", seq, "fixed_batch_step_speedup_vs_transformer"]
        base = got["transformer", seq, "fixed_batch_step_tokens_per_s"]
        assert (own["batch"], own["dtype"], own["extra"]["tokens_per_step"]) == (1, "bf16", seq)
        assert ratio["extra"]["baseline_tokens_per_s"] == base["value"]
        assert ratio["value"] == pytest.approx(own["value"] / base["value"])


def test_a_baseline_not_under_test_is_measured_for_the_ratio(pytester):
    result, records = run_protocol(pytester, "phase2:tiny", tokens="64")
    result.assert_outcomes(passed=1, skipped=1)
    (ratio,) = [r for r in records if r["metric"] == "fixed_step_speedup_vs_transformer"]
    assert ratio["batch"] == 1 and ratio["value"] > 0
    assert ratio["extra"]["baseline_tokens_per_s"] > 0


BASELINE_OOM = """
import pytest
import torch

@pytest.fixture(autouse=True)
def baseline_out_of_memory(request, monkeypatch):
    real = request.module.fixed_step

    def fixed_step(case, tokens, cache, loss_chunk=0):
        if case.model == "transformer":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.00 GiB")
        return real(case, tokens, cache, loss_chunk)

    monkeypatch.setattr(request.module, "fixed_step", fixed_step)
"""


def test_a_baseline_out_of_memory_leaves_the_ratio_inconclusive_not_the_model_failed(pytester):
    pytester.makeconftest(BASELINE_OOM)
    result, records = run_protocol(pytester, "phase2:tiny", tokens="64")
    result.assert_outcomes(passed=1, skipped=1)
    got = {r["metric"]: r for r in records}
    assert got["fixed_step_tokens_per_s"]["value"] > 0
    ratio = got["fixed_step_speedup_vs_transformer"]
    assert (ratio["value"], ratio["status"]) == (None, "INCONCLUSIVE")
    assert ratio["extra"]["why"] == ("transformer:tiny ran out of memory: CUDA out of memory. "
                                     "Tried to allocate 13.00 GiB")
    assert result.ret == pytest.ExitCode.OK


def test_tokens_per_step_must_be_a_positive_integer(pytester):
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest("-p", "no:cacheprovider", "--no-results", "--tokens-per-step",
                                "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "argument --tokens-per-step: '0' is not a positive integer" in result.stderr.str()


@pytest.mark.slow  # torch.compile traces the tiny model and its transformer
def test_the_compiled_step_is_recorded_with_its_gain_and_ratio(pytester):
    shutil.copy(REPO / "bench" / "test_throughput.py", pytester.path / "test_throughput.py")
    # a subprocess: an inner session in this process drops the compiler modules it imported,
    # and importing them again in a later test registers their caches twice
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-k", "compiled", "--results", str(pytester.path / "results"),
        "--device", "cpu", "--seq", "64", "--model", "phase8:tiny", "--tokens-per-step", "128",
        "--compile", "aot_eager")
    result.assert_outcomes(passed=2)  # at --tokens-per-step and at --batch
    records = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    got = {r["metric"]: r for r in records}
    assert set(got) == {"compiled_step_tokens_per_s", "compile_gain",
                        "compiled_step_speedup_vs_transformer", "compiled_step_graphs",
                        "compiled_batch_step_tokens_per_s", "batch_compile_gain",
                        "compiled_batch_step_speedup_vs_transformer",
                        "compiled_batch_step_graphs"}
    # the whole step, no graph break, at either budget
    assert got["compiled_step_graphs"]["value"] == got["compiled_batch_step_graphs"]["value"] == 1
    assert got["compiled_step_tokens_per_s"]["batch"] == 2
    assert got["compiled_batch_step_tokens_per_s"]["batch"] == 1
    own = got["compiled_step_tokens_per_s"]
    assert "torch.compile (backend aot_eager)" in own["extra"]["protocol"]
    assert own["value"] == pytest.approx(128 / own["extra"]["median_s"])
    gain = got["compile_gain"]
    assert gain["value"] == pytest.approx(own["value"] / gain["extra"]["eager_tokens_per_s"])
    assert got["compiled_step_speedup_vs_transformer"]["extra"]["baseline"] == "transformer:tiny"


def test_without_compile_the_compiled_step_is_skipped_and_a_bad_backend_is_named(pytester):
    shutil.copy(REPO / "bench" / "test_throughput.py", pytester.path / "test_throughput.py")
    args = ("-p", "no:cacheprovider", "-k", "compiled", "--no-results", "--device", "cpu",
            "--seq", "64", "--model", "phase8:tiny", "-rs")
    result = pytester.runpytest(*args)
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*--compile not given: the compiled step is not measured*"])
    result = pytester.runpytest(*args, "--compile", "tvm")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "argument --compile: invalid choice: 'tvm'" in result.stderr.str()
