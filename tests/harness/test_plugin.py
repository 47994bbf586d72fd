"""muse's pytest plugin seen from outside: inner pytest sessions (`pytester`) over small test
files that use its fixtures with trivial measurements, judged by exit status, terminal output
and the results file."""

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import muse.harness.results
from muse import models

# In-process inner sessions (pytester.runpytest) drop the modules they imported when they end,
# and a module with native bindings cannot be imported twice in one process: triton's nanobind
# aborts it, torch's lazily loaded libraries re-register their ops. The results file's
# environment facts import triton, so they are gathered once here; sessions that run real
# models go to a subprocess.
muse.harness.results.environment_facts()

REPO = Path(__file__).resolve().parents[2]
NO_CACHE = ("-p", "no:cacheprovider")
TINY = ("--model", "transformer:tiny")
USAGE_ERROR = pytest.ExitCode.USAGE_ERROR
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

PASSING = """
def test_x(case, record):
    rec = record(case, "m", 1.0, "1", threshold=2.0, comparison="<")
    assert rec.passed
"""


def results_dir(pytester) -> Path:
    return pytester.path / "results"


def run(pytester, *args, results=True):
    """An in-process inner session on transformer:tiny; results go to pytester's own folder."""
    where = ("--results", str(results_dir(pytester))) if results else ("--no-results",)
    return pytester.runpytest(*NO_CACHE, *where, *args)


def latest(pytester) -> dict:
    return json.loads((results_dir(pytester) / "latest.json").read_text())


def collected_ids(result) -> list[str]:
    return [line for line in result.outlines if "::" in line]


# --- bad input is a usage error that names the value and what is valid ---------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seq", "0"], "argument --seq: '0' is not a positive integer"),
        (["--seq", "-3"], "argument --seq: '-3' is not a positive integer"),
        (["--seq", "abc"], "argument --seq: 'abc' is not a positive integer"),
        (["--seq", "1.5"], "argument --seq: '1.5' is not a positive integer"),
        (["--seq", "64", "64"], "--seq lists a length twice: 64 64"),
        (["--batch", "0"], "argument --batch: '0' is not a positive integer"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8' (choose from *fp32*)"),
        (["--device", "gpu"], "argument --device: invalid choice: 'gpu' (choose from *cpu*)"),
        (["--model", "nope"], f"unknown model 'nope'; valid models: {', '.join(models.names())}"),
        (
            ["--model", "transformer:huge"],
            "unknown preset 'huge' for model 'transformer'; "
            "valid presets: tiny, small, base, large",
        ),
        (
            ["--model", "transformer", "transformer"],
            "--model lists a model twice: transformer transformer",
        ),
        (["--vram-limit-gb", "0"], "argument --vram-limit-gb: '0' is not a positive finite number"),
        (["--min-grad", "-1"], "argument --min-grad: '-1' is not a positive finite number"),
        (["--min-r2", "inf"], "argument --min-r2: 'inf' is not a positive finite number"),
        (
            ["--max-quadratic-share", "1"],
            "argument --max-quadratic-share: '1' is not a fraction in (0, 1)",
        ),
        (["--min-r2", "2"], "argument --min-r2: '2' is not a fraction in (0, 1)"),
        (["--scaling-z", "0"], "argument --scaling-z: '0' is not a positive finite number"),
        (
            ["--min-loglog-slope", "1.2"],
            "--min-loglog-slope 1.2 must be below --max-loglog-slope 1.15",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_option_is_a_usage_error_naming_the_value(pytester, args, message):
    pytester.makepyfile(test_memory=PASSING)
    result = run(pytester, *args, results=False)
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])
    assert "passed" not in result.stdout.str()


@needs_no_cuda
def test_device_cuda_without_cuda_is_a_usage_error(pytester):
    pytester.makepyfile(test_memory=PASSING)
    result = run(pytester, *TINY, "--device", "cuda", results=False)
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--device cuda was given but CUDA is not available*use --device cpu*"]
    )


def test_unwritable_results_is_a_usage_error_when_a_test_records(pytester):
    pytester.makepyfile(test_memory=PASSING)
    (pytester.path / "a_file").write_text("not a folder")
    result = pytester.runpytest(*NO_CACHE, *TINY, "--seq", "64", "--results", "a_file/results")
    assert result.ret == USAGE_ERROR
    result.stdout.fnmatch_lines(["*--results: results directory a_file/results is not writable*"])
    result.assert_outcomes()


def test_unwritable_results_is_no_error_when_nothing_records(pytester):
    pytester.makepyfile(test_plain="def test_x(case):\n    assert case.seq == 64\n")
    (pytester.path / "a_file").write_text("not a folder")
    result = pytester.runpytest(*NO_CACHE, *TINY, "--seq", "64", "--results", "a_file/results")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1)


@pytest.mark.slow
def test_unwritable_results_under_xdist_is_a_usage_error(pytester):
    pytester.makepyfile(test_memory=PASSING)
    (pytester.path / "a_file").write_text("not a folder")
    result = pytester.runpytest(
        *NO_CACHE, "-n", "1", *TINY, "--seq", "64", "--results", "a_file/results"
    )
    assert result.ret == USAGE_ERROR
    assert "results directory a_file/results is not writable" in str(result.stdout) + str(
        result.stderr
    )


# --- parametrization ids ----------------------------------------------------------------------

IDS_FILE = """
def test_case(case):
    pass

def test_longest(longest_case):
    pass

def test_model(model_case):
    pass
"""


@pytest.mark.parametrize("seqs", [("64", "128"), ("128", "64")], ids=["sorted", "unsorted"])
def test_ids_are_readable_and_seqs_sorted(pytester, seqs):
    pytester.makepyfile(test_ids=IDS_FILE)
    result = run(pytester, "--collect-only", "-q", *TINY, "--dtype", "fp32", "--seq", *seqs)
    assert result.ret == pytest.ExitCode.OK
    assert collected_ids(result) == [
        "test_ids.py::test_case[transformer:tiny-seq64-fp32]",
        "test_ids.py::test_case[transformer:tiny-seq128-fp32]",
        "test_ids.py::test_longest[transformer:tiny-seq128-fp32]",
        "test_ids.py::test_model[transformer:tiny-fp32]",
    ]


def test_ids_default_seqs_dtype_and_models_in_the_order_given(pytester):
    pytester.makepyfile(test_ids=IDS_FILE)
    result = run(
        pytester, "--collect-only", "-q", "--model", "transformer-eager:small", "transformer:tiny"
    )
    cases = [
        f"{m}-seq{s}-fp16"
        for m in ("transformer-eager:small", "transformer:tiny")
        for s in (1024, 2048, 4096)
    ]
    assert collected_ids(result) == [
        *(f"test_ids.py::test_case[{c}]" for c in cases),
        "test_ids.py::test_longest[transformer-eager:small-seq4096-fp16]",
        "test_ids.py::test_longest[transformer:tiny-seq4096-fp16]",
        "test_ids.py::test_model[transformer-eager:small-fp16]",
        "test_ids.py::test_model[transformer:tiny-fp16]",
    ]


def test_no_model_option_means_every_family_needing_no_extra_at_its_default_preset(pytester):
    pytester.makepyfile(test_ids=IDS_FILE)
    result = run(pytester, "--collect-only", "-q", "--seq", "8")
    expected = [":".join(models.resolve(name)) for name in models.default_names()]
    models_collected = [i for i in collected_ids(result) if "::test_model[" in i]
    assert models_collected == [f"test_ids.py::test_model[{spec}-fp16]" for spec in expected]
    # the families behind an optional extra (the fla peers) run only when named
    optional = sorted(set(models.names()) - set(models.default_names()))
    assert optional and all(name.startswith("fla-") for name in optional)
    assert not [i for i in collected_ids(result) if any(f"[{n}:" in i for n in optional)]


def test_settings_and_thresholds_reach_the_tests(pytester):
    pytester.makepyfile(
        test_settings="""
        import torch

        def test_settings(muse_settings, muse_session, model_case):
            assert muse_settings is muse_session.settings
            assert muse_settings.models == (("transformer", "tiny"),)
            assert muse_settings.seqs == (64, 128)
            assert (muse_settings.dtype, muse_settings.batch) == ("bf16", 3)
            assert muse_settings.device == torch.device("cpu")
            assert muse_settings.thresholds.min_grad == 1e-3
            assert muse_settings.thresholds.vram_limit_gb == 2.5
            assert muse_settings.results_dir is None
            assert (model_case.seq, model_case.seqs, model_case.batch) == (None, (64, 128), 3)
        """
    )
    result = run(
        pytester,
        *TINY,
        "--seq", "128", "64",
        "--dtype", "bf16",
        "--batch", "3",
        "--device", "cpu",
        "--min-grad", "1e-3",
        "--vram-limit-gb", "2.5",
        results=False,
    )  # fmt: skip
    result.assert_outcomes(passed=1)


# --- gpu marker -------------------------------------------------------------------------------

GPU_FILE = """
import pytest

pytestmark = pytest.mark.gpu

def test_on_gpu(case):
    assert case.device.type == "cpu"
"""


@needs_no_cuda
def test_gpu_marker_skips_without_cuda_and_names_device_cpu(pytester):
    pytester.makepyfile(test_gpu=GPU_FILE)
    result = run(pytester, *TINY, "--seq", "64", "--device", "auto", "-rs", results=False)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*needs CUDA, which is not available; --device cpu*"])


@needs_no_cuda
def test_gpu_marker_runs_with_device_cpu(pytester):
    pytester.makepyfile(test_gpu=GPU_FILE)
    result = run(pytester, *TINY, "--seq", "64", "--device", "cpu", results=False)
    result.assert_outcomes(passed=1)


# --- record → results file --------------------------------------------------------------------

RECORDING = """
def test_x(case, record):
    rec = record(case, "peak_bytes", 1.5e6, "bytes", threshold=2e6, comparison="<")
    assert rec.passed
    record(case, "loss", 3.25, "1")
"""


def test_record_writes_run_file_and_latest(pytester):
    pytester.makepyfile(test_memory=RECORDING)
    result = run(pytester, *TINY, "--seq", "64", "--dtype", "fp32", "--batch", "2")
    result.assert_outcomes(passed=1)

    files = sorted(p.name for p in results_dir(pytester).iterdir())
    assert len(files) == 2 and "latest.json" in files
    run_file = results_dir(pytester) / next(f for f in files if f != "latest.json")
    assert run_file.read_bytes() == (results_dir(pytester) / "latest.json").read_bytes()
    result.stdout.fnmatch_lines([f"results: *{run_file.name}"])

    doc = latest(pytester)
    assert doc["schema_version"] == 1
    assert run_file.name == f"{doc['run']}.json"
    assert isinstance(doc["command"], str) and doc["command"]
    assert set(doc["git"]) == {"sha", "dirty"}
    assert doc["environment"]["torch"] == torch.__version__
    assert doc["environment"]["cuda_available"] == torch.cuda.is_available()
    assert doc["summary"] == {"passed": 1, "failed": 0, "inconclusive": 0, "recorded": 1}

    params = models.build("transformer", "tiny").num_params()
    assert isinstance(params, int) and params > 0
    common = {
        "criterion": "memory",
        "model": "transformer",
        "preset": "tiny",
        "params": params,
        "seq": 64,
        "batch": 2,
        "dtype": "fp32",
        "device": "cpu" if not torch.cuda.is_available() else "cuda",
        "case_id": "transformer:tiny-seq64-fp32",
        "extra": {},
    }
    assert doc["records"] == [
        {
            **common,
            "metric": "peak_bytes",
            "value": 1.5e6,
            "unit": "bytes",
            "threshold": 2e6,
            "comparison": "<",
            "status": "PASS",
            "passed": True,
        },
        {
            **common,
            "metric": "loss",
            "value": 3.25,
            "unit": "1",
            "threshold": None,
            "comparison": None,
            "status": "RECORDED",
            "passed": None,
        },
    ]


def test_no_results_writes_nothing(pytester):
    pytester.makepyfile(test_memory=RECORDING)
    result = run(pytester, *TINY, "--seq", "64", results=False)
    result.assert_outcomes(passed=1)
    assert not results_dir(pytester).exists()
    assert not (pytester.path / "reports").exists()
    assert "results: " not in result.stdout.str()


def test_results_file_carries_the_settings(pytester):
    pytester.makepyfile(test_memory=RECORDING)
    run(pytester, *TINY, "--seq", "128", "64", "--min-grad", "1e-3")
    settings = latest(pytester)["settings"]
    assert settings["models"] == ["transformer:tiny"]
    assert settings["seqs"] == [64, 128]
    assert settings["thresholds"]["min_grad"] == 1e-3
    assert settings["tf32"] is True  # as training's default


def test_no_tf32_is_recorded_in_the_settings(pytester):
    pytester.makepyfile(test_memory=RECORDING)
    run(pytester, *TINY, "--seq", "64", "--no-tf32")
    assert latest(pytester)["settings"]["tf32"] is False


@pytest.mark.parametrize("flag, allowed", [((), True), (("--no-tf32",), False)])
def test_each_criterion_runs_under_the_tf32_setting(pytester, flag, allowed):
    """bench/conftest.py sets float32 matmuls for every criterion and restores them after."""
    pytester.makeconftest((Path(__file__).parents[2] / "bench" / "conftest.py").read_text())
    pytester.makepyfile(test_setting=f"""
        import torch

        def test_setting():
            assert torch.backends.cuda.matmul.allow_tf32 is {allowed}
    """)
    before = torch.backends.cuda.matmul.allow_tf32
    run(pytester, *TINY, "--seq", "64", *flag).assert_outcomes(passed=1)
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("runner", ["inprocess", "subprocess"])
def test_results_file_command_is_this_sessions_command(pytester, runner):
    pytester.makepyfile(test_memory=RECORDING)
    args = ["--results", str(results_dir(pytester)), *TINY, "--seq", "64"]
    getattr(pytester, f"runpytest_{runner}")(*NO_CACHE, *args).assert_outcomes(passed=1)
    command = latest(pytester)["command"]
    assert command.startswith("pytest ")
    assert command.endswith(shlex.join(args))


@pytest.mark.slow
def test_xdist_workers_hand_their_records_to_the_controller(pytester):
    pytester.makepyfile(
        test_memory="""
        def test_x(case, record):
            record(case, "m", 1.0 if case.seq == 64 else 3.0, "1", threshold=2.0, comparison="<")
        """
    )
    result = run(pytester, "-n", "1", *TINY, "--seq", "64", "128", "--dtype", "fp32")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    records = latest(pytester)["records"]
    assert sorted((r["seq"], r["status"]) for r in records) == [(64, "PASS"), (128, "FAIL")]


# --- terminal summary and exit status ---------------------------------------------------------

HEADER = r"criterion\s+model\s+seq\s+metric\s+value\s+threshold\s+result\s*$"


def test_summary_table_has_a_header_and_a_pass_row(pytester):
    pytester.makepyfile(test_memory=PASSING)
    result = run(pytester, *TINY, "--seq", "64", "--dtype", "fp32")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*= muse acceptance criteria =*"])
    result.stdout.re_match_lines(
        [HEADER, r"[- ]+$", r"memory\s+transformer:tiny\s+64\s+m\s+1\s+< 2\s+PASS\s*$"]
    )


def test_failing_record_fails_the_run_with_a_fail_row(pytester):
    pytester.makepyfile(
        test_memory="""
        from muse.harness.summary import describe

        def test_x(case, record):
            rec = record(case, "m", 3.0, "1", threshold=2.0, comparison="<")
            assert rec.passed, describe(rec)
        """
    )
    result = run(pytester, *TINY, "--seq", "64")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: m = 3 (needs < 2): FAIL*"])
    result.stdout.re_match_lines([HEADER, r"memory\s+transformer:tiny\s+64\s+m\s+3\s+< 2\s+FAIL"])
    assert latest(pytester)["summary"]["failed"] == 1


def test_fail_record_in_a_test_that_does_not_assert_still_fails_the_run(pytester):
    pytester.makepyfile(
        test_memory="""
        def test_x(case, record):
            record(case, "m", 3.0, "1", threshold=2.0, comparison="<")
        """
    )
    result = run(pytester, *TINY, "--seq", "64")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.re_match_lines([r"memory\s+transformer:tiny\s+64\s+m\s+3\s+< 2\s+FAIL"])


def test_recorded_rows_appear_only_when_asked(pytester):
    pytester.makepyfile(
        test_memory="""
        def test_x(case, record):
            record(case, "hidden_metric", 1.0, "1")
            record(case, "shown_metric", 2.5e9, "bytes", extra={"summary": True})
        """
    )
    result = run(pytester, *TINY, "--seq", "64")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.re_match_lines(
        [HEADER, r"memory\s+transformer:tiny\s+64\s+shown_metric\s+2\.500 GB\s+RECORDED"]
    )
    assert "hidden_metric" not in result.stdout.str()
    assert [r["metric"] for r in latest(pytester)["records"]] == ["hidden_metric", "shown_metric"]


def test_no_records_no_summary(pytester):
    pytester.makepyfile(test_plain="def test_x(case):\n    pass\n")
    result = run(pytester, *TINY, "--seq", "64")
    result.assert_outcomes(passed=1)
    assert "muse acceptance criteria" not in result.stdout.str()
    assert not results_dir(pytester).exists()


# --- out of memory ----------------------------------------------------------------------------


def test_out_of_memory_fails_its_own_case_and_is_recorded(pytester):
    pytester.makepyfile(
        test_memory="""
        import torch

        def test_x(case, record):
            if case.seq == 128:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            assert record(case, "m", 1.0, "1", threshold=2.0, comparison="<").passed
        """
    )
    result = run(pytester, *TINY, "--seq", "64", "128", "256", "--dtype", "fp32", "-v")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_x?transformer:tiny-seq64-fp32? PASSED*",
            "*test_x?transformer:tiny-seq128-fp32? FAILED*",
            "*test_x?transformer:tiny-seq256-fp32? PASSED*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "out of memory at transformer:tiny-seq128-fp32 (batch 1, seq 128): "
            "CUDA out of memory. Tried to allocate 2.00 GiB"
        ]
    )
    result.stdout.re_match_lines([r"memory\s+transformer:tiny\s+128\s+run\s+not measured\s+OOM"])

    records = latest(pytester)["records"]
    assert [(r["seq"], r["status"]) for r in records] == [(64, "PASS"), (128, "OOM"), (256, "PASS")]
    oom = records[1]
    assert oom["metric"] == "run" and oom["value"] is None
    assert oom["case_id"] == "transformer:tiny-seq128-fp32"
    assert "Tried to allocate 2.00 GiB" in oom["extra"]["error"]


def test_out_of_memory_without_a_case_names_the_test(pytester):
    pytester.makepyfile(
        test_plain="""
        import torch

        def test_big():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        """
    )
    result = run(pytester, *TINY, "--seq", "64")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["out of memory at test_plain.py::test_big: CUDA out of memory.*"])
    assert not results_dir(pytester).exists()


# --- pytest-json-report -----------------------------------------------------------------------


def test_json_report_metadata_holds_the_records(pytester):
    pytester.makepyfile(test_memory=RECORDING)
    report = pytester.path / "r.json"
    result = run(
        pytester, *TINY, "--seq", "64", "128", "--json-report", f"--json-report-file={report}"
    )
    result.assert_outcomes(passed=2)
    tests = json.loads(report.read_text())["tests"]
    by_case = {}
    for r in latest(pytester)["records"]:
        by_case.setdefault(r["case_id"], []).append(r)
    assert len(tests) == 2
    for test in tests:
        case_id = test["nodeid"].partition("[")[2].rstrip("]")
        muse = test["metadata"]["muse"]
        assert [r["metric"] for r in muse] == ["peak_bytes", "loss"]
        assert muse == by_case[case_id]


# --- the real criteria, end to end --------------------------------------------------------------


@pytest.mark.slow
def test_stability_and_gradient_flow_criteria_pass_on_cpu(pytester):
    for name in ("test_stability.py", "test_gradient_flow.py"):
        shutil.copy(REPO / "bench" / name, pytester.path / name)
    result = pytester.runpytest_subprocess(
        *NO_CACHE, "--results", str(results_dir(pytester)),
        "--device", "cpu", "--dtype", "fp32", *TINY, "--seq", "32", "64",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=3)

    records = latest(pytester)["records"]
    assert {r["criterion"] for r in records} == {"stability", "gradient_flow"}
    assert not [r for r in records if r["status"] in ("FAIL", "OOM", "ERROR")]
    gated = {r["metric"]: r for r in records if r["criterion"] == "gradient_flow"}
    for metric in ("first_layer_grad_norm", "long_range_grad_norm"):
        rec = gated[metric]
        assert (rec["status"], rec["seq"], rec["threshold"]) == ("PASS", 64, 1e-5)
        assert rec["value"] >= 1e-5


CONTROL_OOM = """
import torch

from muse.harness.cases import Case

build = Case.build


def build_eager_that_runs_out_of_memory(self, *args, **kwargs):
    model = build(self, *args, **kwargs)
    if self.model == "transformer-eager":
        forward = model.forward

        def oom_from_128(ids, *a, **k):
            if ids.shape[1] >= 128:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
            return forward(ids, *a, **k)

        model.forward = oom_from_128
    return model


Case.build = build_eager_that_runs_out_of_memory
"""


@pytest.mark.slow
def test_a_control_out_of_memory_does_not_fail_the_model_under_test(pytester):
    shutil.copy(REPO / "bench" / "test_scaling.py", pytester.path / "test_scaling.py")
    pytester.makeconftest(CONTROL_OOM)
    result = pytester.runpytest_subprocess(
        *NO_CACHE, "--results", str(results_dir(pytester)),
        "--device", "cpu", "--dtype", "fp32", *TINY, "--seq", "32", "64", "128", "-rA",
    )  # fmt: skip
    assert "out of memory at transformer:tiny" not in result.stdout.str()
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
    records = latest(pytester)["records"]
    assert not [r for r in records if r["status"] in ("OOM", "ERROR")]
    verdicts = [r for r in records if r["metric"].endswith("_loglog_slope_top")]
    assert {r["extra"]["phase"] for r in verdicts} == {"forward", "train_step"}
    for r in verdicts:
        eager = r["extra"]["controls"]["transformer-eager:tiny"]
        assert eager["verdict"] == "FAIL"
        assert eager["reasons"][0].startswith("out of memory at seq 128: CUDA out of memory")
        sdpa = r["extra"]["controls"]["transformer:tiny"]  # the model itself, matched to itself
        assert sdpa["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")


def test_memory_is_gated_at_the_gate_seq_when_every_seq_is_below_it(pytester):
    shutil.copy(REPO / "bench" / "test_memory.py", pytester.path / "test_memory.py")
    below = run(pytester, *TINY, "--seq", "64", "128", "--collect-only", "-q", results=False)
    assert "test_memory.py::test_forward_peak_vram_at_the_gate_seq[transformer:tiny-seq4096-fp16]"\
        in collected_ids(below)
    below = run(pytester, *TINY, "--seq", "64", "128", "--vram-gate-seq", "2048", "--collect-only",
                "-q", results=False)
    assert "test_memory.py::test_forward_peak_vram_at_the_gate_seq[transformer:tiny-seq2048-fp16]"\
        in collected_ids(below)
    reaching = run(pytester, *TINY, "--seq", "64", "4096", "-rs", results=False)
    reaching.assert_outcomes(skipped=5)  # on the CPU every memory case skips, saying why
    reaching.stdout.fnmatch_lines(
        ["SKIPPED ?1? test_memory.py: --seq reaches --vram-gate-seq 4096: test_forward_peak_vram*"]
    )


PEEKING = """
from muse.harness.cases import Case

build = Case.build


def build_peeking(self, *args, **kwargs):
    model = build(self, *args, **kwargs)
    if self.preset == "tiny":
        forward = model.forward
        # A kernel that reads ahead: each position's logits move with the next token.
        model.forward = lambda ids, *a, **k: forward(ids) + 1e-2 * forward(ids.roll(-1, 1))
    return model


Case.build = build_peeking
"""


@pytest.mark.slow
@pytest.mark.parametrize("peeking", [False, True], ids=["causal", "reads-ahead"])
def test_causality_criterion_fails_a_model_that_reads_ahead(pytester, peeking):
    shutil.copy(REPO / "bench" / "test_causality.py", pytester.path / "test_causality.py")
    if peeking:
        pytester.makeconftest(PEEKING)
    result = pytester.runpytest_subprocess(
        *NO_CACHE, "--results", str(results_dir(pytester)),
        "--device", "cpu", "--dtype", "fp32", *TINY, "--seq", "16", "64",
    )  # fmt: skip
    records = [r for r in latest(pytester)["records"] if r["metric"] == "future_token_leak"]
    assert [r["seq"] for r in records] == [16, 64]
    if peeking:
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.assert_outcomes(failed=2)
        assert all(r["status"] == "FAIL" and r["value"] > 1e-4 for r in records)
    else:
        assert result.ret == pytest.ExitCode.OK
        result.assert_outcomes(passed=2)
        assert all(r["status"] == "PASS" and r["value"] == 0.0 for r in records)
    assert all(r["threshold"] == r["extra"]["rerun_noise"] for r in records)


def test_a_second_session_in_the_same_second_gets_its_own_history_folder(tmp_path):
    from muse.harness.plugin import _fresh_folder

    first = _fresh_folder(tmp_path / "20261201T000000Z-abc1234-perplexity")
    second = _fresh_folder(tmp_path / "20261201T000000Z-abc1234-perplexity")
    assert first.is_dir() and second.is_dir() and first != second
    assert second.name.endswith(f"-p{os.getpid()}")


def test_a_run_stopped_early_is_marked_and_leaves_latest_alone(pytester):
    pytester.makepyfile(test_memory=RECORDING)
    run(pytester, *TINY, "--seq", "64", "--dtype", "fp32").assert_outcomes(passed=1)
    complete = latest(pytester)
    assert complete["complete"] is True and "missing" not in complete
    pytester.makepyfile(test_memory=RECORDING + "\n\ndef test_y():\n    assert False\n"
                        "\n\ndef test_z(case, record):\n    record(case, 'm', 1.0, '1')\n")
    run(pytester, *TINY, "--seq", "64", "--dtype", "fp32", "-x").assert_outcomes(
        passed=1, failed=1)
    assert latest(pytester) == complete  # the stopped run did not displace it
    stopped = [json.loads(p.read_text()) for p in results_dir(pytester).glob("2*.json")]
    stopped = [d for d in stopped if not d["complete"]]
    assert len(stopped) == 1
    assert stopped[0]["missing"] == "stopped early: 2 of 3 tests ran to their end"


@pytest.mark.slow
def test_two_bench_runs_at_once_into_one_folder_keep_every_record(tmp_path):
    import subprocess
    import sys

    (tmp_path / "conftest.py").write_text('pytest_plugins = ["muse.harness.plugin"]\n')
    (tmp_path / "test_rec.py").write_text(
        "import os\n\ndef test_x(case, record):\n"
        "    record(case, 'pid', float(os.getpid()), '1')\n")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "pytest", "-q", *NO_CACHE, *TINY,
           "--seq", "64", "--dtype", "fp32", "--results", str(out), str(tmp_path)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    docs = [json.loads(f.read_text()) for f in out.glob("2*.json")]
    pids = sorted(r["value"] for d in docs for r in d["records"])
    assert len(docs) == 2 and pids == sorted(float(p.pid) for p in procs)
    assert json.loads((out / "latest.json").read_text()) in docs
