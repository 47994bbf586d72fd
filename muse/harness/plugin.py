"""muse's pytest plugin: options, validation, parametrization of the acceptance criteria over
models and seqs, the `record` fixture through which every measured number reaches the results
file, the terminal summary and the exit status.

It has no `pytest11` entry point, so installing muse changes no one else's pytest run: a
project loads it from its root conftest.py with `pytest_plugins = ["muse.harness.plugin"]` (as
muse's own does), then writes its own criteria with the `case`, `longest_case`, `model_case`
and `record` fixtures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from muse.harness.cases import (
    DEFAULT_SEQS,
    Settings,
    Thresholds,
    fraction,
    positive_float,
    positive_int,
)

if TYPE_CHECKING:
    from muse.training.quality import GateRuns, QualitySettings

SESSION_KEY = pytest.StashKey["MuseSession"]()
CASE_FIXTURES = ("case", "longest_case", "model_case")
MUSE_FIXTURES = frozenset({*CASE_FIXTURES, "record", "muse_session", "muse_settings",
                           "quality_runs"})


@dataclass
class MuseSession:
    settings: Settings
    started_at: datetime
    records: list = field(default_factory=list)  # list[muse.harness.results.Record]
    cache: dict = field(default_factory=dict)  # per-session measurements shared by tests
    results_path: Path | None = None
    tests_finished: int = 0  # tests that ran to their end (passed, failed or skipped)
    records_sent: int = 0  # an xdist worker's records already handed to the controller


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("muse", "muse acceptance criteria")
    group.addoption(
        "--seq",
        nargs="+",
        type=positive_int,
        metavar="N",
        help=f"sequence lengths (positive ints; default {' '.join(map(str, DEFAULT_SEQS))})",
    )
    group.addoption(
        "--model",
        nargs="+",
        metavar="NAME[:PRESET]",
        help="registered models, optionally with a preset (default: every family)",
    )
    group.addoption(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        default="fp16",
        help="compute dtype of the criteria (default fp16)",
    )
    group.addoption("--batch", type=positive_int, default=1, help="batch size (default 1)")
    group.addoption(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA float32 matmuls may use TF32 in the criteria, as training does by default "
        "(--no-tf32: exact float32; the perplexity runs take --train-tf32)",
    )
    from muse.measure.phases import TOKENS_PER_STEP
    from muse.training.quality import nonnegative_int

    group.addoption(
        "--tokens-per-step",
        type=positive_int,
        default=TOKENS_PER_STEP,
        metavar="N",
        help="throughput: the fixed-tokens protocol's tokens per training step, batch = N // seq "
        f"(default {TOKENS_PER_STEP})",
    )
    group.addoption(
        "--loss-chunk",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="throughput: the fixed-tokens protocol's loss made N positions at a time, the logits"
        " never whole (muse.layers.head), for every model alike; 0 (default): the full logits",
    )
    group.addoption(
        "--cuda-graphs",
        action="store_true",
        help="throughput and scaling: also time the work replayed from a CUDA graph, without "
        "launch overhead (muse.measure.graphs): throughput the fixed-tokens step of every model "
        "and its matched transformer; scaling the forward and the train step (bf16 or fp32 "
        "only) of every model and its O(N²) controls",
    )
    group.addoption(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        choices=("inductor", "aot_eager", "eager"),
        metavar="BACKEND",
        help="throughput: also time the fixed-tokens step with the model under torch.compile "
        "(BACKEND inductor by default, which fuses kernels; aot_eager and eager only trace), "
        "every model and its matched transformer alike",
    )
    group.addoption(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: CUDA if present, and gpu criteria skip without it; "
        "cpu: run every criterion on the CPU as a smoke test",
    )
    group.addoption(
        "--results",
        default="reports/results",
        metavar="DIR",
        help="folder of the results files (<run>.json and latest.json)",
    )
    group.addoption("--no-results", action="store_true", help="write no results file")
    add_perplexity_options(group)
    t = Thresholds()
    group.addoption("--vram-limit-gb", type=positive_float, default=t.vram_limit_gb)
    group.addoption(
        "--vram-gate-seq",
        type=positive_int,
        default=t.vram_gate_seq,
        help="the VRAM limit applies at seqs ≥ this",
    )
    group.addoption("--min-grad", type=positive_float, default=t.min_grad)
    group.addoption("--max-ppl-degradation", type=positive_float, default=t.max_ppl_degradation)
    group.addoption("--min-r2", type=fraction, default=t.min_r2)
    group.addoption("--max-loglog-slope", type=positive_float, default=t.max_loglog_slope)
    group.addoption(
        "--min-loglog-slope",
        type=positive_float,
        default=t.min_loglog_slope,
        help="scaling: below this log-log slope at the longest seq a fixed cost hides the "
        f"growth and the verdict is INCONCLUSIVE (default {t.min_loglog_slope})",
    )
    group.addoption(
        "--max-quadratic-share",
        type=fraction,
        default=t.max_quadratic_share,
        help="scaling: the most of t(N_max) the N² term of a + bN + cN² may take "
        f"(default {t.max_quadratic_share})",
    )
    group.addoption(
        "--scaling-z",
        type=positive_float,
        default=t.scaling_z,
        help="scaling: standard errors of timing noise a fact must clear its threshold by "
        f"(default {t.scaling_z})",
    )
    group.addoption(
        "--min-speedup",
        type=positive_float,
        default=t.min_speedup,
        help="gate tokens/s over the matched transformer (default: recorded only)",
    )


def add_perplexity_options(group) -> None:
    from muse.training.quality import (
        QualitySettings,
        checkpoint_arg,
        jobs_arg,
        nonnegative_int,
        tokenizer_arg,
    )

    q = QualitySettings()
    group.addoption(
        "--corpus",
        default=q.corpus,
        metavar="SPEC",
        help=f"perplexity: corpus folder, .txt file or wikitext-2/-103 (default {q.corpus})",
    )
    group.addoption(
        "--tokenizer",
        type=tokenizer_arg,
        default=q.tokenizer,
        help=f"perplexity: bytes, gpt2 or bpe:<vocab> (default {q.tokenizer})",
    )
    group.addoption(
        "--train-tokens",
        type=positive_int,
        default=q.train_tokens,
        metavar="N",
        help="perplexity: training tokens per run, every run the same "
        f"(default {q.train_tokens}); steps = N // (train-batch × train-seq)",
    )
    group.addoption(
        "--train-seq", type=positive_int, default=q.seq_len, help="perplexity: training seq"
    )
    group.addoption(
        "--train-batch", type=positive_int, default=q.batch_size, help="perplexity: batch size"
    )
    group.addoption(
        "--train-tf32",
        action=argparse.BooleanOptionalAction,
        default=q.tf32,
        help="perplexity: CUDA float32 matmuls may use TF32 in training and scoring "
        "(--no-train-tf32: exact float32)",
    )
    group.addoption(
        "--train-lr",
        type=positive_float,
        help=f"perplexity: peak learning rate, cosine to a tenth (default {q.lr})",
    )
    group.addoption(
        "--lr-sweep",
        nargs="+",
        type=positive_float,
        metavar="LR",
        help="perplexity: train every model and baseline at each peak rate, score the run with "
        "the best final valid loss (instead of --train-lr; budget: tokens × rates)",
    )
    group.addoption(
        "--train-dtype",
        choices=("fp16", "bf16", "fp32"),
        default=q.dtype,
        help=f"perplexity: autocast of training and scoring, apart from --dtype "
        f"(default {q.dtype})",
    )
    group.addoption(
        "--seeds",
        nargs="+",
        type=nonnegative_int,
        metavar="SEED",
        help="perplexity: training seeds, at least 2 (default 0 1)",
    )
    group.addoption(
        "--ppl-context",
        type=positive_int,
        metavar="N",
        help="perplexity: scoring window (default --train-seq)",
    )
    group.addoption(
        "--ppl-stride",
        type=positive_int,
        metavar="N",
        help="perplexity: window stride (default half the context)",
    )
    group.addoption(
        "--checkpoint",
        action="append",
        type=checkpoint_arg,
        default=[],
        metavar="NAME=PATH",
        help="perplexity: score trained checkpoints instead of training (repeat: one per "
        "model, baseline and seed)",
    )
    group.addoption(
        "--also-corpus",
        action="append",
        default=[],
        metavar="SPEC",
        help="perplexity: score the same checkpoints on this corpus's test split too, through "
        "the gate's tokenizer (recorded, not gated); repeatable",
    )
    group.addoption(
        "--train-dir",
        metavar="DIR",
        help="perplexity: keep the runs' checkpoints here (default: a temporary folder)",
    )
    group.addoption(
        "--train-jobs",
        type=jobs_arg,
        default=q.train_jobs,
        metavar="N",
        help="perplexity: train N runs at once, each in its own process, over every GPU "
        "(several share one when N > GPUs); 1: one after another; default auto: 8 on CUDA "
        "(fewer below 16 CPU cores), 1 elsewhere",
    )


def quality_from_options(config: pytest.Config, models, device) -> QualitySettings:
    from muse.training.quality import QualitySettings

    opt = config.getoption
    checkpoints = tuple(opt("checkpoint") or ())
    seeds = opt("seeds")
    if checkpoints and seeds:
        raise ValueError("--seeds and --checkpoint exclude each other: a checkpoint carries "
                         "the seed it was trained with")
    lr, lr_sweep = opt("train_lr"), tuple(opt("lr_sweep") or ())
    if lr is not None and lr_sweep:
        raise ValueError("--train-lr and --lr-sweep exclude each other: the sweep trains at "
                         "each rate it lists")
    quality = QualitySettings(
        corpus=opt("corpus"),
        tokenizer=opt("tokenizer"),
        train_tokens=opt("train_tokens"),
        seq_len=opt("train_seq"),
        batch_size=opt("train_batch"),
        lr=QualitySettings.lr if lr is None else lr,
        lr_sweep=lr_sweep,
        dtype=opt("train_dtype"),
        tf32=opt("train_tf32"),
        device=device.type,
        seeds=tuple(seeds) if seeds else QualitySettings.seeds,
        context=opt("ppl_context"),
        stride=opt("ppl_stride"),
        checkpoints=checkpoints,
        train_dir=opt("train_dir"),
        train_jobs=opt("train_jobs"),
        also=tuple(opt("also_corpus")),
    )
    quality.check_models([f"{m}:{p}" for m, p in models])
    return quality


def settings_from_options(config: pytest.Config) -> Settings:
    from muse.devices import resolve_device
    from muse.harness.cases import parse_models

    opt = config.getoption
    seqs = tuple(opt("seq") or DEFAULT_SEQS)
    if len(set(seqs)) != len(seqs):
        raise ValueError(f"--seq lists a length twice: {' '.join(map(str, seqs))}")
    results = None if opt("no_results") else Path(opt("results"))
    thresholds = Thresholds(
        vram_limit_gb=opt("vram_limit_gb"),
        vram_gate_seq=opt("vram_gate_seq"),
        min_grad=opt("min_grad"),
        max_ppl_degradation=opt("max_ppl_degradation"),
        min_r2=opt("min_r2"),
        max_loglog_slope=opt("max_loglog_slope"),
        min_loglog_slope=opt("min_loglog_slope"),
        max_quadratic_share=opt("max_quadratic_share"),
        scaling_z=opt("scaling_z"),
        min_speedup=opt("min_speedup"),
    )
    if thresholds.min_loglog_slope >= thresholds.max_loglog_slope:
        raise ValueError(
            f"--min-loglog-slope {thresholds.min_loglog_slope} must be below "
            f"--max-loglog-slope {thresholds.max_loglog_slope}"
        )
    chosen = parse_models(opt("model"))
    device = resolve_device(opt("device"), option="--device")
    return Settings(
        models=chosen,
        seqs=tuple(sorted(seqs)),
        dtype=opt("dtype"),
        batch=opt("batch"),
        device=device,
        device_requested=opt("device"),
        results_dir=results,
        thresholds=thresholds,
        quality=quality_from_options(config, chosen, device),
        tf32=opt("tf32"),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (or an explicit --device cpu)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    try:
        settings = settings_from_options(config)
        if hasattr(config, "workerinput"):
            pin_worker(config.workerinput["workerid"], settings.device)
        else:
            check_gpu_workers(config.getoption("numprocesses", default=None), settings.device)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SESSION_KEY] = MuseSession(settings, datetime.now(timezone.utc))
    config.pluginmanager.register(
        _FinishedTests(config.stash[SESSION_KEY], hasattr(config, "workerinput")), "muse-finished")


def check_gpu_workers(workers, device) -> None:
    """`-n N` of pytest-xdist on CUDA: worker gwK runs on GPU K, so N GPUs at least."""
    if not isinstance(workers, int) or workers < 1 or device.type != "cuda":
        return
    import torch

    count = torch.cuda.device_count()
    if workers > count:
        raise ValueError(f"-n {workers}: each xdist worker runs on a GPU of its own and "
                         f"{count} CUDA device(s) are visible here; use -n {count} or fewer "
                         "(-n auto: one per GPU), or --device cpu")


def pin_worker(workerid: str, device) -> None:
    """xdist worker gwK on GPU K: 'cuda' means cuda:K for every tensor, kernel and memory
    counter of the worker (NVML reads the same index)."""
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(int(workerid.removeprefix("gw")))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` on CUDA: one worker per GPU (xdist's own count on the CPU)."""
    if config.getoption("device", default="auto") == "cpu":
        return None
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def muse_session_of(config: pytest.Config) -> MuseSession:
    return config.stash[SESSION_KEY]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    settings = muse_session_of(metafunc.config).settings
    for name, cases in (
        ("case", settings.cases),
        ("longest_case", settings.longest_cases),
        ("model_case", settings.model_cases),
    ):
        if name in metafunc.fixturenames:
            chosen = cases()
            metafunc.parametrize(name, chosen, ids=[c.id for c in chosen])


def pytest_collection_modifyitems(session: pytest.Session, config, items) -> None:
    muse = muse_session_of(config)
    if hasattr(config, "workerinput"):  # the xdist controller checks, before workers start
        return
    if any("quality_runs" in getattr(i, "fixturenames", ()) for i in items):
        from muse.training.quality import check_corpus_exists

        try:  # before any other criterion spends its time
            check_corpus_exists(muse.settings.quality.corpus)
        except ValueError as exc:
            pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
    if muse.settings.results_dir is None or not any("record" in i.fixturenames for i in items):
        return
    from muse.harness.results import check_writable

    try:
        check_writable(muse.settings.results_dir)
    except ValueError as exc:
        pytest.exit(f"--results: {exc}", returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under xdist the controller collects nothing itself: check --results here, where a usage
    error can still stop the run cleanly."""
    config = session.config
    muse = muse_session_of(config)
    if config.pluginmanager.hasplugin("dsession") and muse.settings.results_dir is not None:
        from muse.harness.results import check_writable

        try:
            check_writable(muse.settings.results_dir)
        except ValueError as exc:
            raise pytest.UsageError(f"--results: {exc}") from None


def pytest_runtest_setup(item: pytest.Item) -> None:
    settings = muse_session_of(item.config).settings
    if item.get_closest_marker("gpu") and settings.device.type != "cuda":
        if settings.device_requested != "cpu":
            pytest.skip("needs CUDA, which is not available; --device cpu runs it on the CPU")


def _case_of(item: pytest.Item):
    funcargs = getattr(item, "funcargs", {})
    return next((funcargs[n] for n in CASE_FIXTURES if n in funcargs), None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """An out-of-memory fails its own case, with the size it tried, and frees the memory so
    the run goes on with the next case. A user's mistake found only now (a --checkpoint that
    is not one) is a usage error: the run stops, with that one line."""
    import torch

    from muse.errors import MuseError, one_line

    try:
        return (yield)
    except MuseError as exc:
        pytest.exit(f"{item.nodeid}: {one_line(exc)}", returncode=pytest.ExitCode.USAGE_ERROR)
    except torch.OutOfMemoryError as exc:
        case = _case_of(item)
        message = str(exc).splitlines()[0]
        traceback.clear_frames(exc.__traceback__)
        from muse.measure.memory import free_device_memory

        free_device_memory()
        if case is not None:
            record_oom(item, case, message)
        where = (
            f"{case.id} (batch {case.batch}, seq {case.seq or max(case.seqs)})"
            if case
            else item.nodeid
        )
        raise pytest.fail.Exception(f"out of memory at {where}: {message}", pytrace=False) from None


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Frees the device memory a criterion held before the next case measures its own; a test
    that uses no muse fixture keeps its CUDA cache."""
    uses_muse = not MUSE_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
    if uses_muse and muse_session_of(item.config).settings.device.type == "cuda":
        from muse.measure.memory import free_device_memory

        try:
            free_device_memory()
        except RuntimeError as error:
            # A CUDA error is sticky: every later test would error on the same context. Stop
            # here, name the test that broke it, and keep what was measured (marked incomplete).
            pytest.exit(f"the CUDA context is unusable after {item.nodeid}, so no later test "
                        f"can run: {str(error).splitlines()[0]}", returncode=1)


def criterion_of(item_or_request) -> str:
    name = Path(str(item_or_request.path)).stem
    return name.removeprefix("test_")


def record_oom(item: pytest.Item, case, message: str) -> None:
    from muse.harness.results import Record

    muse_session_of(item.config).records.append(
        Record(
            criterion=criterion_of(item),
            model=case.model,
            preset=case.preset,
            metric="run",
            value=None,
            unit="",
            status="OOM",
            seq=case.seq,
            batch=case.batch,
            dtype=case.dtype,
            device=str(case.device),
            case_id=case.id,
            extra={"error": message},
        )
    )


class Recorder:
    """`record(case, metric, value, unit, threshold=..., comparison=...)` → the Record, with its
    verdict when a threshold is given. Tests assert `rec.passed`, so the verdict in the results
    file and pytest's outcome cannot disagree."""

    def __init__(self, request: pytest.FixtureRequest, muse: MuseSession):
        self.request = request
        self.muse = muse
        self.criterion = criterion_of(request)

    def __call__(
        self,
        case,
        metric: str,
        value,
        unit: str,
        *,
        threshold=None,
        comparison=None,
        status: str | None = None,
        seq: int | None = None,
        extra: dict | None = None,
    ):
        from muse.harness.results import Record, verdict

        if status is None:
            status = "RECORDED" if threshold is None else verdict(value, threshold, comparison)
        rec = Record(
            criterion=self.criterion,
            model=case.model,
            preset=case.preset,
            metric=metric,
            value=None if value is None else float(value),
            unit=unit,
            status=status,
            params=case.num_params() if hasattr(case, "num_params") else None,
            seq=seq if seq is not None else case.seq,
            batch=case.batch,
            dtype=case.dtype,
            device=str(case.device),
            threshold=threshold,
            comparison=comparison,
            case_id=case.id,
            extra=dict(extra or {}),
        )
        self.muse.records.append(rec)
        metadata = self._json_metadata()
        if metadata is not None:
            metadata.setdefault("muse", []).append(rec.to_dict())
        return rec

    def _json_metadata(self) -> dict | None:
        if not self.request.config.pluginmanager.hasplugin("pytest_jsonreport"):
            return None
        if not self.request.config.getoption("json_report", default=False):
            return None
        return self.request.getfixturevalue("json_metadata")


@pytest.fixture(scope="session")
def muse_session(pytestconfig: pytest.Config) -> MuseSession:
    return muse_session_of(pytestconfig)


@pytest.fixture(scope="session")
def muse_settings(muse_session: MuseSession) -> Settings:
    return muse_session.settings


@pytest.fixture
def record(request: pytest.FixtureRequest, muse_session: MuseSession) -> Recorder:
    return Recorder(request, muse_session)


@pytest.fixture(scope="session")
def quality_runs(muse_session: MuseSession, request: pytest.FixtureRequest) -> Iterator[GateRuns]:
    """The perplexity gate's training runs, shared by every model of the session; their
    histories go beside the results file, in <results>/<run>-perplexity/. Each run's start and
    end are written to the terminal as they happen, counted against the runs the collected
    gate tests need."""
    from muse.harness.results import git_facts, run_name
    from muse.training.quality import GateRuns

    settings = muse_session.settings
    quality, history = settings.quality, None
    # xdist: each worker trains its models' runs on its GPU; none shares a folder with another
    worker = getattr(request.config, "workerinput", {}).get("workerid")
    if settings.results_dir is not None:
        run = run_name(muse_session.started_at, git_facts().get("sha"))
        history = _fresh_folder(
            settings.results_dir / (f"{run}-perplexity" + (f"-{worker}" if worker else "")))
    if worker and quality.train_dir is not None:
        quality = replace(quality, train_dir=str(Path(quality.train_dir) / worker))
    runs = GateRuns(quality, history, say=_terminal_line(request.config))
    cases = (getattr(getattr(i, "callspec", None), "params", {}).get("model_case")
             for i in request.session.items if "quality_runs" in getattr(i, "fixturenames", ()))
    runs.plan(list(dict.fromkeys(c.spec for c in cases if c is not None)))
    yield runs
    runs.close()
    if history is not None and not any(history.iterdir()):
        history.rmdir()  # nothing was trained: leave no empty folder behind


def _fresh_folder(path: Path) -> Path:
    """`path`, made here and now; a session started in the same second of the same commit got
    it first, so this one adds its pid (as the results file does) and never writes into it."""
    for candidate in (path, path.with_name(f"{path.name}-p{os.getpid()}")):
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path} and its -p{os.getpid()} variant both exist")


def _terminal_line(config: pytest.Config):
    """A function writing one line to the terminal at once, even from inside a test whose
    output pytest captures; None where there is no terminal (an xdist worker)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return None

    def say(line: str) -> None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line(line)
            reporter.flush()

    return say


def _failed(records) -> list:
    return [r for r in records if r.status in ("FAIL", "OOM", "ERROR")]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """An xdist worker hands each test's records to the controller with the test's teardown
    report (an attribute xdist carries over), so a run stopped early or interrupted keeps
    what every finished test measured."""
    outcome = yield
    if call.when == "teardown" and hasattr(item.config, "workerinput"):
        muse = muse_session_of(item.config)
        outcome.get_result().muse_records = [r.to_dict()
                                             for r in muse.records[muse.records_sent:]]
        muse.records_sent = len(muse.records)


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    config = session.config
    muse = muse_session_of(config)
    if hasattr(config, "workerinput"):  # what no teardown report carried (made after the last)
        config.workeroutput["muse_records"] = [r.to_dict()
                                               for r in muse.records[muse.records_sent:]]
        return
    if muse.records and muse.settings.results_dir is not None:
        from muse.harness.results import build_document, write_document

        doc = build_document(
            muse.records,
            ["pytest", *config.invocation_params.args],
            started_at=muse.started_at,
            finished_at=datetime.now(timezone.utc),
        )
        doc["settings"] = muse.settings.describe()
        doc["complete"], missing = _completeness(session, exitstatus, muse.tests_finished)
        if missing:
            doc["missing"] = missing
        muse.results_path = write_document(doc, muse.settings.results_dir,
                                           latest=doc["complete"])
    if _failed(muse.records) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


class _FinishedTests:
    """Counts the tests that ran to their teardown; xdist forwards its workers' reports to the
    controller, so the count is the whole run's there too, and so are the records they carry."""

    def __init__(self, muse: MuseSession, worker: bool):
        self.muse, self.worker = muse, worker

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "teardown":
            self.muse.tests_finished += 1
            # on the controller: the records a worker made in this test (pytest_runtest_makereport)
            sent = getattr(report, "muse_records", None)
            if sent and not self.worker:
                from muse.harness.results import Record

                self.muse.records.extend(Record.from_dict(d) for d in sent)


def _completeness(session: pytest.Session, exitstatus, finished: int) -> tuple[bool, str]:
    """(every collected test ran, what did not): an interrupted or early-stopped run is kept
    in its own file but marked, and latest.json keeps pointing at the last complete run."""
    collected = session.testscollected
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        return False, f"interrupted: {finished} of {collected} tests ran to their end"
    if finished < collected:
        return False, f"stopped early: {finished} of {collected} tests ran to their end"
    return True, ""


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    from muse.harness.results import Record

    output = getattr(node, "workeroutput", {}) or {}
    records = muse_session_of(node.config).records
    records.extend(Record.from_dict(d) for d in output.get("muse_records", []))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    from muse.harness.summary import summary_table

    muse = muse_session_of(config)
    if not muse.records:
        return
    terminalreporter.write_sep("=", "muse acceptance criteria")
    for line in summary_table(muse.records):
        terminalreporter.write_line(line)
    if muse.results_path is not None:
        terminalreporter.write_line(f"results: {muse.results_path}")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    from muse.harness.results import environment_facts

    machine_info["muse"] = environment_facts()


BENCHMARK_STORAGE_DEFAULT = "file://./.benchmarks"  # pytest-benchmark's own default


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Saved benchmarks go to one storage folder per GPU kind (.benchmarks/nvidia-h200/, …, or
    .benchmarks/cpu/), so --benchmark-compare never compares an H100 run with an H200 one.
    pytest-benchmark opens its storage in its pytest_configure, after this hook; an explicit
    --benchmark-storage is left alone."""
    import re

    storage = config.getoption("benchmark_storage", default=None)
    saving = any(config.getoption(o, default=None) for o in (
        "benchmark_save", "benchmark_autosave", "benchmark_compare", "benchmark_compare_fail"))
    if storage != BENCHMARK_STORAGE_DEFAULT or not saving:
        return
    kind = "cpu"
    if config.getoption("device", default="auto") != "cpu":
        import torch

        if torch.cuda.is_available():
            kind = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    config.option.benchmark_storage = f"{BENCHMARK_STORAGE_DEFAULT}/{kind or 'gpu'}"
