"""bench/test_scaling.py's graphed phases, run in inner sessions on the CPU: they are collected
beside the eager ones, skip without --cuda-graphs or CUDA, saying why, and a graphed training
step asked for in fp16 fails its case in one line. Nothing is timed."""

import shutil
from pathlib import Path

import muse.harness.results

muse.harness.results.environment_facts()  # see tests/harness/test_plugin.py: triton once, here

REPO = Path(__file__).resolve().parents[2]
TEST = "test_time_grows_linearly[transformer:tiny-{dtype}-{phase}]"


def run_scaling(pytester, *args):
    shutil.copy(REPO / "bench" / "test_scaling.py", pytester.path / "test_scaling.py")
    return pytester.runpytest("-p", "no:cacheprovider", "--no-results", "--device", "cpu",
                              "--model", "transformer:tiny", "--seq", "32", "64", "128", *args)


def test_every_phase_is_collected_eager_and_graphed(pytester):
    result = run_scaling(pytester, "--collect-only", "-q")
    phases = ("forward", "train_step", "graphed_forward", "graphed_train_step")
    assert [line for line in result.outlines if "::" in line] == [
        "test_scaling.py::" + TEST.format(dtype="fp16", phase=p) for p in phases]


def test_the_graphed_phases_skip_without_cuda_graphs(pytester):
    result = run_scaling(pytester, "-k", "graphed", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        ["SKIPPED [[]2[]] test_scaling.py:*: --cuda-graphs not given: the graphed phases are not "
         "timed"])


def test_the_graphed_phases_skip_off_cuda(pytester):
    result = run_scaling(pytester, "-k", "graphed", "-rs", "--cuda-graphs", "--dtype", "bf16")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        ["SKIPPED [[]2[]] test_scaling.py:*: a CUDA graph needs CUDA; this run is on cpu"])


def test_a_graphed_training_step_in_fp16_fails_in_one_line(pytester):
    result = run_scaling(pytester, "-k", "graphed", "-rs", "--cuda-graphs", "--dtype", "fp16")
    result.assert_outcomes(failed=1, skipped=1)  # the forward holds in fp16; off CUDA it skips
    name = TEST.format(dtype="fp16", phase="graphed_train_step").replace("[", "[[]")
    result.stdout.fnmatch_lines([  # the failure is the message alone, no traceback
        f"_* {name} _*",
        "graphed_train_step cannot run in --dtype fp16: fp16 loss scaling checks for inf on the "
        "host every step, which a CUDA graph cannot hold; pass --dtype bf16 or fp32",
        "=* short test summary info =*",
    ], consecutive=True)
