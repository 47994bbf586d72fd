"""Default selection, seen from a fresh pytest process in the repository: `pytest` alone runs
the fast CPU suite (pytest.ini's `-m "not slow and not gpu"`), the criteria in bench/ are all
collected unless the command line says -m, and an explicit -m is obeyed in both."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ("--device", "cpu", "--model", "transformer:tiny", "--seq", "64", "128")


def collect(*args, addopts=None) -> tuple[int, int]:
    """(selected, deselected) of `pytest --collect-only ARGS` run from the repository root."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_PLUGINS", "PYTEST_ADDOPTS")}
    if addopts:
        env["PYTEST_ADDOPTS"] = addopts
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # 5: everything deselected
    last = proc.stdout.strip().splitlines()[-1]
    match = re.match(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", last)
    if match:
        return int(match[1]), int(match[3])
    match = re.match(r"(\d+) tests? collected", last)
    assert match, last
    return int(match[1]), 0


def test_unit_suite_default_leaves_out_slow_and_gpu_tests():
    # tests/packaging/test_wheel.py is slow; tests/ops/test_decayed_scan_triton.py has both
    files = ("tests/packaging", "tests/ops/test_decayed_scan_triton.py")
    selected, deselected = collect(*files)
    assert selected > 0 and deselected > 0
    assert collect(*files, "-m", "not slow and not gpu") == (selected, deselected)


@pytest.mark.slow  # three collections of bench/ in fresh processes: about 10 s
def test_bench_collects_every_criterion_unless_told_otherwise(tmp_path):
    corpus = tmp_path / "corpus.txt"  # the perplexity gate checks its corpus at collection
    corpus.write_text("a line of text\n" * 20)
    tiny = (*TINY, "--corpus", str(corpus))
    every, deselected = collect("bench", *tiny)
    assert every > 0 and deselected == 0
    for args, addopts in ((("-m", "slow"), None), ((), "-m slow")):
        selected, deselected = collect("bench", *tiny, *args, addopts=addopts)
        assert 0 < selected < every and selected + deselected == every
