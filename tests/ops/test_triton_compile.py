"""Every launch of muse's Triton kernels (triton_workload.py), compiled for an H100/H200 (sm_90)
down to a cubin on a machine without a GPU. The interpreter the other CPU tests run the kernels
on accepts code the compiler rejects, such as a kernel reading a global that is not a
tl.constexpr instance."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

RECORD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import triton_workload
    specs = triton_workload.record_launches()
    triton_workload.exercise(lambda case: None)
    print(json.dumps(specs))
    """
)

COMPILE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import triton_workload
    results = []
    for spec in json.load(sys.stdin):
        try:
            results.append(triton_workload.compile_for_hopper(spec))
        except Exception as e:
            results.append(triton_workload.describe(e))
    print(json.dumps(results))
    """
)

# guards the source scan below: it must find at least these
KNOWN = {
    *(("muse.ops.bk_core.triton", k)
      for k in ("_chunk_totals", "_group_totals", "_scan_totals", "_chunk_outputs")),
    ("muse.ops.decayed_scan.triton", "_scan_kernel"),
    ("muse.ops.complex_scan.triton", "_scan_kernel"),
}


def _launch_sites() -> set[tuple[str, str]]:
    """(module, kernel) for each `kernel[grid](...)` of a @triton.jit function in muse's source,
    so a kernel the workload never launches is named rather than left uncompiled."""
    sites = set()
    for path in (ROOT / "muse").rglob("*.py"):
        text = path.read_text()
        if "triton.jit" not in text:
            continue
        tree = ast.parse(text)
        jitted = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                  and any(ast.unparse(d).startswith("triton.jit") for d in f.decorator_list)}
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        sites |= {(module, node.func.value.id) for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                  and isinstance(node.func.value, ast.Name) and node.func.value.id in jitted}
    return sites


def _skip_without_hopper_compiler():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    nvidia = importlib.util.find_spec("triton.backends.nvidia")
    if nvidia is None:
        pytest.skip("this triton has no NVIDIA backend to compile for sm_90")
    bundled = Path(next(iter(nvidia.submodule_search_locations)), "bin", "ptxas")
    if not bundled.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("this triton has no ptxas (bundled or TRITON_PTXAS_PATH) to make a cubin")


@pytest.mark.slow  # the interpreter runs the whole workload to see its launches
def test_every_triton_kernel_compiles_for_hopper(tmp_path):
    _skip_without_hopper_compiler()
    here = str(Path(__file__).parent)
    record = subprocess.run(
        [sys.executable, "-c", RECORD, here], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=600,
    )
    assert record.returncode == 0, record.stderr[-4000:]
    specs = json.loads(record.stdout.strip().splitlines()[-1])

    sites = _launch_sites()
    assert KNOWN <= sites, KNOWN - sites
    launched = {(s["module"], s["name"]) for s in specs}
    assert launched == sites, f"never launched by triton_workload.py: {sorted(sites - launched)}"

    # a fresh cache, so each kernel is compiled here rather than found from an earlier run
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    compiled = subprocess.run(
        [sys.executable, "-c", COMPILE, here], input=json.dumps(specs),
        env={**env, "TRITON_CACHE_DIR": str(tmp_path)}, capture_output=True, text=True,
        timeout=600,
    )
    assert compiled.returncode == 0, compiled.stderr[-4000:]
    results = json.loads(compiled.stdout.strip().splitlines()[-1])
    failures = {}  # one entry per kernel and error, however many launches share it
    for spec, result in zip(specs, results, strict=True):
        if isinstance(result, str):
            kernel = f"{spec['module']}.{spec['name']}"
            failures.setdefault((kernel, result), []).append(spec["constexprs"])
    assert not failures, "\n\n".join(f"{kernel} (constants {consts}):\n{error}"
                                       for (kernel, error), consts in failures.items())
    assert all("cubin" in stages for stages in results), results
