"""Saved pytest-benchmark runs land in one storage folder per GPU kind (here: cpu)."""

import pytest
import torch

import muse.harness.results

# The inner sessions' machine_info imports triton, whose native module aborts the process when
# imported a second time after an in-process session drops it: import it once here, first.
muse.harness.results.environment_facts()

BENCH = """
def test_sum(benchmark):
    benchmark.pedantic(sum, args=(range(10),), rounds=2, iterations=1)
"""
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch):
    # pytest-benchmark switches itself off when PYTEST_XDIST_WORKER is set, and an inner
    # session inherits it from an outer `pytest -n N` worker
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)


@needs_no_cuda
def test_autosave_and_compare_use_the_cpu_folder(pytester):
    pytester.makepyfile(test_b=BENCH)
    assert pytester.runpytest("-p", "no:cacheprovider", "--benchmark-autosave").ret == 0
    saved = list((pytester.path / ".benchmarks").glob("*/*/*.json"))
    assert [p.relative_to(pytester.path).parts[1] for p in saved] == ["cpu"]
    result = pytester.runpytest("-p", "no:cacheprovider", "--benchmark-compare")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["test_sum (0001_*"])  # the saved run, beside (NOW)


def test_an_explicit_storage_is_left_alone(pytester):
    pytester.makepyfile(test_b=BENCH)
    args = ("-p", "no:cacheprovider", "--benchmark-autosave", "--benchmark-storage", "mine")
    assert pytester.runpytest(*args).ret == 0
    assert len(list((pytester.path / "mine").glob("*/*.json"))) == 1
    assert not (pytester.path / ".benchmarks").exists()
