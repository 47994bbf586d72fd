"""The criteria run whatever their markers: pytest.ini's `-m "not slow and not gpu"` selects
the fast unit suite and holds in a run that collects bench/ only when the command line (or
PYTEST_ADDOPTS) gives -m itself, so `pytest bench --benchmark-compare` and the CPU smoke run
(`--device cpu`) collect every criterion."""

import os
import shlex

import pytest

from muse.devices import float32_matmuls


@pytest.fixture(autouse=True)
def _float32_matmuls(muse_settings):
    """Each criterion runs with --tf32's setting (on: as training does by default)."""
    with float32_matmuls(muse_settings.tf32):
        yield


def pytest_configure(config):
    given = [*config.invocation_params.args, *shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))]
    if not any(str(arg).startswith("-m") for arg in given):
        config.option.markexpr = ""
