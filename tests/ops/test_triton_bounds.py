"""Every Triton kernel of muse (BK-Core, the decayed and the complex scans), run by the
interpreter with a bounds check (triton_bounds.py): no masked-in load or store may touch memory
outside the tensors its launch was given, at lengths that leave a program's last tiles past
the end (N = 1, 2, 5, 9, 33, 100, 257)."""

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
    import triton_bounds
    triton_bounds.install()
    import torch
    from muse.ops.bk_core.triton import causal_backward_triton, causal_forward_triton
    from muse.ops.complex_scan.triton import complex_decayed_cumsum_triton
    from muse.ops.decayed_scan.triton import decayed_cumsum_triton, linear_scan

    found = {}
    for n in (1, 2, 5, 9, 33, 100, 257):
        torch.manual_seed(n)
        a = torch.complex(torch.randn(2, n, 3), -torch.rand(2, n, 3) - 0.5)
        k = torch.rand(2, max(n - 1, 0), 3) + 0.25
        g = causal_forward_triton(a, k)
        found[f"bk_core forward {n}"] = list(triton_bounds.violations)
        triton_bounds.violations.clear()
        causal_backward_triton(g, k, torch.randn_like(g))
        found[f"bk_core backward {n}"] = list(triton_bounds.violations)
        triton_bounds.violations.clear()
        u, log_decay = torch.randn(2, n, 5), -torch.rand(5)
        decayed_cumsum_triton(u, log_decay)
        linear_scan(u, -torch.rand(2, n), reverse=True)
        found[f"decayed scans {n}"] = list(triton_bounds.violations)
        triton_bounds.violations.clear()
        planar = torch.randn(2, n, 2 * 40, requires_grad=True)
        complex_decayed_cumsum_triton(planar, -torch.rand(40), torch.rand(40)).sum().backward()
        found[f"complex scan {n}"] = list(triton_bounds.violations)
        triton_bounds.violations.clear()
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
    assert len(found) == 28
    bad = {case: v for case, v in found.items() if v}
    assert not bad, bad
