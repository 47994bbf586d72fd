"""Installing muse changes no one else's pytest run: an unrelated project with its own
`--device` option runs as if muse were absent, and a project that asks for the plugin in its
conftest.py gets the fixtures. Both run as fresh pytest processes in a temp folder, with no
PYTEST_PLUGINS or PYTEST_ADDOPTS from this session."""

import importlib.util
import os
import subprocess
import sys

UNRELATED_CONFTEST = """
def pytest_addoption(parser):
    parser.addoption("--device", default="abacus", help="this project's own device")
"""

UNRELATED_TEST = """
import sys


def test_own_device_option_and_no_muse(pytestconfig):
    assert pytestconfig.getoption("device") == "slide-rule"
    assert not any(m == "muse" or m.startswith("muse.") for m in sys.modules)
    assert not pytestconfig.pluginmanager.hasplugin("muse.harness.plugin")
    assert "torch" not in sys.modules
"""

OPTING_IN_CONFTEST = 'pytest_plugins = ["muse.harness.plugin"]\n'

OPTING_IN_TEST = """
def test_uses_a_muse_case(case):
    assert (case.model, case.seq, case.device.type) == ("transformer", 64, "cpu")
"""


def pytest_in(folder, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_PLUGINS", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_an_unrelated_project_with_its_own_device_option_runs_untouched(tmp_path):
    assert importlib.util.find_spec("muse") is not None  # installed, importable from anywhere
    (tmp_path / "conftest.py").write_text(UNRELATED_CONFTEST)
    (tmp_path / "test_own.py").write_text(UNRELATED_TEST)
    proc = pytest_in(tmp_path, "--device", "slide-rule")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_a_project_that_asks_for_the_plugin_in_its_conftest_gets_the_fixtures(tmp_path):
    (tmp_path / "conftest.py").write_text(OPTING_IN_CONFTEST)
    (tmp_path / "test_mine.py").write_text(OPTING_IN_TEST)
    proc = pytest_in(tmp_path, "--model", "transformer:tiny", "--seq", "64", "--device", "cpu",
                     "--no-results")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


CUDA_SESSION = """
import dataclasses

import pytest
import torch

from muse.harness.plugin import SESSION_KEY


@pytest.hookimpl(trylast=True)
def pytest_configure(config):  # a CUDA session, as far as the plugin's teardown can tell
    muse = config.stash[SESSION_KEY]
    muse.settings = dataclasses.replace(muse.settings, device=torch.device("cuda"))
"""

TWO_TESTS = """
def test_unrelated():
    pass


def test_a_criterion(muse_settings):
    assert muse_settings.device.type == "cuda"
"""


# Patched inside the inner run: an in-process pytester run re-imports muse's modules, so a
# patch made out here may not be the module the inner run's hooks see.
COUNT_FREES = """
import muse.measure.memory

_original = muse.measure.memory.free_device_memory


def _count():
    with open("frees.txt", "a") as f:
        f.write("1")


muse.measure.memory.free_device_memory = _count


def pytest_unconfigure(config):  # the module outlives this run: later tests get it back whole
    muse.measure.memory.free_device_memory = _original
"""

BREAK_CONTEXT = """
import muse.measure.memory

_original = muse.measure.memory.free_device_memory


def _broken():
    raise RuntimeError("CUDA error: an illegal memory access was encountered\\nmore")


muse.measure.memory.free_device_memory = _broken


def pytest_unconfigure(config):
    muse.measure.memory.free_device_memory = _original
"""


def test_device_memory_is_freed_after_muse_tests_only(pytester):
    pytester.makeconftest(CUDA_SESSION + COUNT_FREES)
    pytester.makepyfile(test_two=TWO_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "--no-results", "-v")
    result.assert_outcomes(passed=2)
    assert (pytester.path / "frees.txt").read_text() == "1"

THREE_TESTS = """
def test_breaks_the_device(muse_settings):
    pass


def test_would_error_on_a_broken_context(muse_settings):
    pass


def test_also_never_runs(muse_settings):
    pass
"""


def test_a_broken_cuda_context_stops_the_run_naming_the_test(pytester):
    pytester.makeconftest(CUDA_SESSION + BREAK_CONTEXT)
    pytester.makepyfile(test_three=THREE_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "--no-results")
    assert result.ret == 1
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*CUDA context is unusable after test_three.py::test_breaks_the_"
                                 "device*illegal memory access was encountered*"])
