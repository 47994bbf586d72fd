"""Every Triton kernel of muse (BK-Core, the decayed, complex and matrix scans, the delta
rule's solve, walk and read-out, the short conv), run by the interpreter with a bounds check
(triton_bounds.py): no masked-in load or store may touch memory outside the tensors its launch
was given, at lengths that leave a program's last tiles past the end (triton_workload.py's
launches, N = 1 … 257)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import triton_bounds, triton_workload
    triton_bounds.install()

    found = {}

    def take(case):
        found[case] = list(triton_bounds.violations)
        triton_bounds.violations.clear()

    triton_workload.exercise(take)
    print(json.dumps(found))
    """
)


@pytest.mark.slow  # the interpreter subprocess
def test_no_triton_kernel_reads_or_writes_outside_its_tensors():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(Path(__file__).parent)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found) == 8 * 7  # eight groups of launches (triton_workload.exercise), seven lengths
    bad = {case: v for case, v in found.items() if v}
    assert not bad, bad
