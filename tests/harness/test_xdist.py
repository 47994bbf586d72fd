"""`pytest bench -n N` with pytest-xdist: worker gwK on GPU K, no more workers than GPUs, and
the records of every worker in the one results file the controller writes."""

import json
import subprocess
from types import SimpleNamespace

import pytest
import torch

import muse.harness.results
from muse.harness import plugin

muse.harness.results.environment_facts()  # see test_plugin.py: native modules imported once, here

CUDA = torch.device("cuda")
WHO_RECORDS = """
import os

def test_x(case, record):
    record(case, "m", 1.0, "1", extra={"worker": os.environ["PYTEST_XDIST_WORKER"]})
"""
GATE_FOLDERS = """
import os

def test_x(case, record, quality_runs):
    record(case, "m", 1.0, "1", extra={"worker": os.environ["PYTEST_XDIST_WORKER"],
                                       "history": str(quality_runs.history_dir),
                                       "train_dir": quality_runs.settings.train_dir})
"""


def gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.slow  # two worker interpreters
def test_two_workers_on_the_cpu_hand_all_records_to_one_results_file(pytester):
    """Also: the perplexity gate of each worker keeps its histories and checkpoints in folders
    of its own (two workers may both train a shared baseline)."""
    pytester.makepyfile(test_memory=WHO_RECORDS, test_perplexity=GATE_FOLDERS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-n", "2", "--device", "cpu",
                                "--model", "transformer:tiny", "--seq", "64", "128", "256", "512",
                                "--dtype", "fp32", "--results", str(pytester.path / "results"),
                                "--train-dir", str(pytester.path / "runs"))
    result.assert_outcomes(passed=8)
    doc = json.loads((pytester.path / "results" / "latest.json").read_text())
    records = doc["records"]
    assert sorted((r["criterion"], r["seq"]) for r in records) == sorted(
        (c, s) for c in ("memory", "perplexity") for s in (64, 128, 256, 512))
    assert {r["extra"]["worker"] for r in records} == {"gw0", "gw1"}  # both workers recorded
    for r in records:
        if r["criterion"] == "perplexity":
            worker = r["extra"]["worker"]
            assert r["extra"]["history"].endswith(f"-perplexity-{worker}")
            assert r["extra"]["train_dir"] == str(pytester.path / "runs" / worker)


INTERRUPTED = """
import time
from pathlib import Path

class _Worker:  # loadscope: each class on a worker of its own
    def test_quick(self, case, record):
        record(case, "m", 1.0, "1", extra={"who": type(self).__name__})
        Path(f"quick-{type(self).__name__}").touch()

    def test_slow(self, case, record):
        Path(f"slow-{type(self).__name__}").touch()
        time.sleep(120)
        record(case, "m", 2.0, "1", extra={"who": type(self).__name__})

class TestA(_Worker):
    pass

class TestB(_Worker):
    pass
"""


@pytest.mark.slow  # two worker interpreters, interrupted
def test_an_interrupted_run_on_two_workers_keeps_what_finished_tests_recorded(pytester):
    """SIGINT to the process group (as `timeout -s INT` sends it) while both workers are
    mid-test: the results file is written, marked incomplete, with the finished tests'
    records."""
    import os
    import signal
    import sys
    import time

    pytester.makepyfile(test_memory=INTERRUPTED)
    proc = pytester.popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist",
         "loadscope", "-p", "muse.harness.plugin", "--device", "cpu", "--model",
         "transformer:tiny", "--seq", "64", "--dtype", "fp32", "--results",
         str(pytester.path / "results")],
        stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    markers = [pytester.path / f"{kind}-Test{w}" for kind in ("quick", "slow") for w in "AB"]
    while not all(m.exists() for m in markers):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never got going"
        time.sleep(0.2)
    time.sleep(1.0)  # the quick tests' teardown reports reach the controller
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    files = list((pytester.path / "results").glob("*.json"))
    assert [f.name for f in files if f.name == "latest.json"] == []  # never the latest
    [path] = files
    doc = json.loads(path.read_text())
    assert doc["complete"] is False and doc["missing"].startswith("interrupted")
    assert sorted((r["extra"]["who"], r["value"]) for r in doc["records"]) == [
        ("TestA", 1.0), ("TestB", 1.0)]


def test_more_workers_than_gpus_is_a_usage_error(pytester, monkeypatch):
    gpus(monkeypatch, 1)
    pytester.makepyfile(test_memory=WHO_RECORDS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-n", "2", "--device", "cuda",
                                "--model", "transformer:tiny", "--no-results")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert ("-n 2: each xdist worker runs on a GPU of its own and 1 CUDA device(s) are visible "
            "here; use -n 1 or fewer") in str(result.stderr)


def test_as_many_workers_as_gpus_pass(monkeypatch):
    gpus(monkeypatch, 2)
    for workers in (None, 0, 1, 2):
        plugin.check_gpu_workers(workers, CUDA)
    plugin.check_gpu_workers(8, torch.device("cpu"))  # the CPU: xdist's own business
    with pytest.raises(ValueError, match="-n 3: .* 2 CUDA device"):
        plugin.check_gpu_workers(3, CUDA)


def test_worker_gw_k_runs_on_gpu_k(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    plugin.pin_worker("gw3", CUDA)
    plugin.pin_worker("gw0", torch.device("cpu"))
    assert chosen == [3]


@pytest.mark.parametrize(("device", "count", "workers"),
                         [("auto", 4, 4), ("cuda", 2, 2), ("cpu", 4, None), ("auto", 0, None)])
def test_auto_is_one_worker_per_gpu(monkeypatch, device, count, workers):
    gpus(monkeypatch, count)
    config = SimpleNamespace(getoption=lambda name, default=None: device)
    assert plugin.pytest_xdist_auto_num_workers(config) == workers
