"""Test-suite plugins. `pytester` runs inner pytest sessions for the plugin's tests.

In-process inner sessions drop the modules they imported when they end; torch's lazily
imported compiler stack registers operator libraries at import and cannot be imported twice in
one process. Importing it here, before any inner session, keeps it out of their snapshot."""

import pytest
import torch._dynamo  # noqa: F401

pytest_plugins = ["pytester"]


def pytest_addoption(parser):
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite tests/report/golden/ from this run's output (read the diff "
                          "before committing it)")


@pytest.fixture
def pytester(pytester, monkeypatch):
    """Inner sessions load muse's plugin as a project's conftest.py would (it has no entry
    point), through PYTEST_PLUGINS: in-process sessions, subprocesses and xdist workers all
    read it."""
    monkeypatch.setenv("PYTEST_PLUGINS", "muse.harness.plugin")
    return pytester
