"""A script run under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton
is first imported), its last stdout line read as JSON; skips where the interpreter cannot run
the scan kernels."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest


def run_interpreted(script: str, timeout: int = 600, min_triton: tuple[int, int] = (0, 0)):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < min_triton:
        # seen on the lent H200 (Triton 3.6): its interpreter cannot loop to a kernel argument
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run this kernel")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
