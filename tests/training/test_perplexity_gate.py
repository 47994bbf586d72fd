"""The equal-budget perplexity gate (muse.training.quality) on tiny transformers and a few KB of
text, on the CPU: the arithmetic, the options, the negative control, the shared baselines and the
checkpoint mode. The bench file itself runs in inner sessions against canned comparisons."""

import argparse
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import muse.harness.results
import muse.training.quality
import muse.training.train
from muse.training.evaluate import load_model
from muse.training.quality import (
    Comparison,
    GateProgress,
    GateRuns,
    QualitySettings,
    Scored,
    SweepRun,
    best_run,
    checkpoint_arg,
    degradations,
    duration,
    jobs_arg,
    score,
    score_checkpoint,
    untrained_copy,
)
from muse.training.train import TrainConfig, train

muse.harness.results.environment_facts()  # see test_plugin.py: imports triton once, here

REPO = Path(__file__).resolve().parents[2]
WORDS = ("the cat sat on a mat and the dog ran to the park while rain fell on old stone "
         "roofs of the quiet town by the river").split()
USAGE_ERROR = pytest.ExitCode.USAGE_ERROR


def _text(seed: int, n_lines: int) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(12)) + " .\n"
                   for _ in range(n_lines))


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, (seed, n) in {"train": (0, 120), "valid": (1, 8), "test": (2, 8)}.items():
        (folder / f"{split}.txt").write_text(_text(seed, n), encoding="utf-8")
    return folder


def tiny_settings(corpus: Path, **kw) -> QualitySettings:
    values = dict(corpus=str(corpus), tokenizer="bytes", train_tokens=64 * 4 * 40, seq_len=64,
                  batch_size=4, lr=3e-3, dtype="fp32", device="cpu", seeds=(0, 1), val_tokens=256)
    return QualitySettings(**{**values, **kw})


def scored(seed: int, ppl: float, role: str = "model", spec: str = "transformer:tiny",
           recall: float | None = None, other: float | None = None, lr: float = 1e-3) -> Scored:
    tokens = 0 if role == "control" else 100
    return Scored(spec=spec, seed=seed, role=role, ppl=ppl, bits_per_byte=1.0,
                  ppl_recall=recall or ppl, ppl_other=other or ppl, recall_fraction=0.25,
                  tokens_scored=10, bytes_scored=10, params=1, train_tokens=tokens,
                  lr=None if role == "control" else lr, budget_tokens=tokens * 2,
                  train_seconds=None, train_tokens_per_s=None, source="x", lr_tried=(1e-3, 1e-2),
                  lr_valid_loss=(2.5, 3.0) if lr == 1e-3 else (3.0, 2.5))


# --- arithmetic -------------------------------------------------------------------------------


def test_degradation_is_the_per_seed_ppl_ratio_minus_one():
    assert degradations([11.0, 9.5], [10.0, 10.0]) == pytest.approx([0.1, -0.05])
    with pytest.raises(ValueError, match="one baseline PPL per model PPL"):
        degradations([1.0, 2.0], [1.0])


def test_comparison_means_over_seeds_and_scores_the_control_against_its_own_seed():
    cmp = Comparison(
        model="phase2:tiny",
        baseline="transformer:tiny",
        mode="trained",
        model_runs=(scored(3, 12.0, recall=20.0, other=11.0, lr=1e-3),
                    scored(7, 10.5, recall=16.0, other=10.0, lr=1e-2)),
        baseline_runs=(scored(3, 10.0, "baseline", recall=10.0, other=10.0),
                       scored(7, 15.0, "baseline", recall=10.0, other=12.5)),
        control=scored(7, 30.0, "control"),
    )
    assert cmp.seeds == [3, 7]
    assert cmp.degradations == pytest.approx([0.2, -0.3])
    assert cmp.degradation == pytest.approx(-0.05)
    assert cmp.control_degradation == pytest.approx(30.0 / 15.0 - 1)
    facts = cmp.gate_facts()
    assert facts["spread"]["min"] == pytest.approx(-0.3)
    assert facts["spread"]["max"] == pytest.approx(0.2)
    assert facts["spread"]["std"] == pytest.approx(0.5 / 2**0.5)
    assert facts["per_seed"] == pytest.approx({"3": 0.2, "7": -0.3})
    assert "note" not in facts  # not a self-comparison
    side = cmp.side("baseline")
    assert side["ppl"] == pytest.approx(12.5)
    assert [r["seed"] for r in side["runs"]] == [3, 7]
    # the recall / other split: per seed, then the mean
    assert cmp.part_degradations("recall") == pytest.approx([1.0, 0.6])
    assert cmp.part_degradations("other") == pytest.approx([0.1, -0.2])
    assert cmp.part_degradation("recall") == pytest.approx(0.8)
    assert cmp.part_degradation("other") == pytest.approx(-0.05)
    model = cmp.side("model")
    assert (model["ppl_recall"], model["ppl_other"]) == pytest.approx((18.0, 10.5))
    assert model["recall_fraction"] == 0.25
    # a rate per seed; their mean over seeds is geometric
    assert model["lr_per_seed"] == {"3": 1e-3, "7": 1e-2}
    assert model["lr"] == pytest.approx(1e-2 / 10**0.5)
    assert model["lr_tried"] == [1e-3, 1e-2]
    assert model["lr_valid_loss"] == {"3": [2.5, 3.0], "7": [3.0, 2.5]}
    assert model["lr_at_edge"] == [3, 7]  # of the two rates tried, each seed chose an end
    assert model["budget_tokens"] == 200


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"seeds": (0,)}, "--seeds needs at least 2 seeds for a spread over seeds, got 0"),
        ({"seeds": (1, 1)}, "--seeds lists a seed twice: 1 1"),
        ({"train_tokens": 255}, "--train-tokens 255 is less than one step of --train-batch 4 "
                                "× --train-seq 64 = 256 tokens"),
        ({"context": 32, "stride": 33}, "--ppl-stride must be in [1, --ppl-context 32], got 33"),
        ({"tokenizer": "bpe:12"}, "bpe vocab size must be >= 257"),
        ({"lr_sweep": (1e-3, -1.0)}, "--lr-sweep: -1.0 is not a positive finite learning rate"),
        ({"lr_sweep": (float("nan"),)}, "--lr-sweep: nan is not a positive finite learning rate"),
        ({"lr_sweep": (1e-3, 1e-3)}, "--lr-sweep lists a rate twice: 0.001 0.001"),
        ({"lr_sweep": (1e-3,), "checkpoints": (("transformer:tiny", "a.pt"),)},
         "--lr-sweep and --checkpoint exclude each other"),
    ],
)
def test_bad_settings_name_the_value(tmp_path, kw, message):
    with pytest.raises(ValueError) as info:
        tiny_settings(tmp_path, **kw)
    assert message in str(info.value)


def test_checkpoint_arg_syntax(tmp_path):
    ckpt = tmp_path / "final.pt"
    ckpt.write_bytes(b"")
    assert checkpoint_arg(f"transformer:tiny={ckpt}") == ("transformer:tiny", str(ckpt))
    assert checkpoint_arg(f"transformer={ckpt}") == ("transformer:small", str(ckpt))
    for text, message in [
        ("transformer:tiny", "is not NAME=PATH"),
        (f"={ckpt}", "is not NAME=PATH"),
        ("transformer:tiny=", "is not NAME=PATH"),
        (f"nope={ckpt}", "unknown model 'nope'"),
        (f"transformer:tiny={tmp_path / 'missing.pt'}", "is not a file"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            checkpoint_arg(text)


def test_checkpoint_mode_needs_model_and_baseline_and_uses_every_checkpoint(tmp_path):
    ckpts = (("transformer:tiny", "a.pt"),)
    tiny_settings(tmp_path, checkpoints=ckpts).check_models(["transformer:tiny"])
    with pytest.raises(ValueError, match="none given for transformer-eager:tiny"):
        tiny_settings(tmp_path, checkpoints=ckpts).check_models(["transformer-eager:tiny"])
    with pytest.raises(ValueError, match="names transformer:small, which is neither"):
        tiny_settings(tmp_path, checkpoints=(*ckpts, ("transformer:small", "b.pt"))).check_models(
            ["transformer:tiny"])


OPTION_FILE = """
def test_x(muse_settings, quality_runs):
    assert muse_settings.quality is not None
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "--seeds needs at least 2 seeds for a spread over seeds, got 0"),
        (["--seeds", "-1", "2"], "argument --seeds: '-1' is not a non-negative integer"),
        (["--checkpoint", "transformer:tiny"], "argument --checkpoint: 'transformer:tiny' is not "
                                               "NAME=PATH"),
        (["--checkpoint", "transformer:tiny=nowhere.pt"], "checkpoint 'nowhere.pt' is not a file"),
        (["--tokenizer", "words"], "argument --tokenizer: unknown tokenizer 'words'"),
        (["--train-tokens", "0"], "argument --train-tokens: '0' is not a positive integer"),
        (["--train-tokens", "100"], "--train-tokens 100 is less than one step"),
        (["--ppl-context", "8", "--ppl-stride", "9"], "--ppl-stride must be in [1, --ppl-context "
                                                      "8], got 9"),
        (["--corpus", "no/such/folder"], "--corpus 'no/such/folder' does not exist"),
        (["--lr-sweep"], "argument --lr-sweep: expected at least one argument"),
        (["--lr-sweep", "1e-3", "fast"], "argument --lr-sweep: 'fast' is not a number"),
        (["--lr-sweep", "1e-3", "0"], "argument --lr-sweep: '0' is not a positive finite number"),
        (["--lr-sweep=-1e-3"], "argument --lr-sweep: '-1e-3' is not a positive finite number"),
        (["--lr-sweep", "3e-3", "-1e-3"], "unrecognized arguments: -1e-3"),  # argparse's word
        (["--lr-sweep", "1e-3", "1e-3"], "--lr-sweep lists a rate twice: 0.001 0.001"),
        (["--train-lr", "1e-3", "--lr-sweep", "1e-3", "3e-3"],
         "--train-lr and --lr-sweep exclude each other"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_option_is_a_usage_error(pytester, args, message):
    pytester.makepyfile(test_perplexity=OPTION_FILE)
    result = pytester.runpytest("-p", "no:cacheprovider", "--no-results", "--model",
                                "transformer:tiny", "--device", "cpu", *args)
    assert result.ret == USAGE_ERROR
    assert message in result.stdout.str() + result.stderr.str()


DTYPE_FILE = """
def test_x(muse_settings):
    assert (muse_settings.dtype, muse_settings.quality.dtype) == ({expected!r})
    assert muse_settings.describe()["perplexity"]["dtype"] == {expected[1]!r}
"""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ("fp16", "bf16")),  # the criteria's default dtype does not reach the gate
        (["--dtype", "fp32"], ("fp32", "bf16")),
        (["--train-dtype", "fp32"], ("fp16", "fp32")),
        (["--dtype", "bf16", "--train-dtype", "fp16"], ("bf16", "fp16")),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_the_gate_trains_in_its_own_dtype(pytester, args, expected):
    pytester.makepyfile(test_perplexity=DTYPE_FILE.format(expected=expected))
    result = pytester.runpytest("-p", "no:cacheprovider", "--no-results", "--model",
                                "transformer:tiny", "--device", "cpu", *args)
    result.assert_outcomes(passed=1)


def test_a_bad_train_dtype_is_a_usage_error(pytester):
    pytester.makepyfile(test_perplexity=OPTION_FILE)
    result = pytester.runpytest("-p", "no:cacheprovider", "--no-results", "--model",
                                "transformer:tiny", "--train-dtype", "fp8")
    assert result.ret == USAGE_ERROR
    assert "argument --train-dtype: invalid choice: 'fp8'" in result.stderr.str()


def test_seeds_and_checkpoints_exclude_each_other(pytester, tmp_path):
    ckpt = tmp_path / "final.pt"
    ckpt.write_bytes(b"")
    pytester.makepyfile(test_perplexity=OPTION_FILE)
    result = pytester.runpytest("-p", "no:cacheprovider", "--no-results", "--model",
                                "transformer:tiny", "--seeds", "0", "1",
                                "--checkpoint", f"transformer:tiny={ckpt}")
    assert result.ret == USAGE_ERROR
    assert "--seeds and --checkpoint exclude each other" in result.stderr.str()


def test_the_sweep_keeps_the_lowest_final_valid_loss():
    def runs(*losses):
        return [SweepRun(lr=10.0 ** -i, out=Path(f"r{i}"), valid_loss=v, seconds=1.0)
                for i, v in enumerate(losses)]

    assert best_run(runs(3.0, 2.0, 2.5)).lr == 1e-1
    assert best_run(runs(2.0, 2.0)).lr == 1.0  # a tie: the rate listed first
    # a diverged run is never chosen, whatever its NaN or ∞ compares as
    assert best_run(runs(float("nan"), 4.0)).lr == 1e-1
    assert best_run(runs(4.0, float("inf"), float("nan"))).lr == 1.0


# --- training, the control, shared baselines, checkpoints -------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both sides of transformer:tiny against itself and of transformer-eager:tiny against it,
    trained here (the checkpoints kept), with the number of training runs it took."""
    root = tmp_path_factory.mktemp("gate")
    settings = tiny_settings(write_corpus(root / "corpus"), train_dir=str(root / "runs"))
    runs = GateRuns(settings, history_dir=root / "history")
    calls = []
    real = muse.training.train.train

    def counting(cfg):
        calls.append((cfg.model, cfg.seed))
        return real(cfg)

    mp = pytest.MonkeyPatch()
    mp.setattr(muse.training.train, "train", counting)
    try:
        own = runs.compare("transformer:tiny")
        eager = runs.compare("transformer-eager:tiny")
    finally:
        mp.undo()
    return settings, runs, own, eager, calls, root


def test_trained_gate_and_negative_control(trained):
    settings, _, own, _, _, _ = trained
    assert own.seeds == [0, 1]
    assert [r.role for r in own.model_runs] == ["model", "model"]
    for run in (*own.model_runs, *own.baseline_runs):
        assert run.train_tokens == settings.steps * settings.tokens_per_step
        assert run.train_seconds > 0 and run.train_tokens_per_s > 0
        assert 1.0 < run.ppl < 256.0 / 2  # trained: far better than uniform over bytes
    # separate runs with the same seeds on the CPU: identical, so exactly 0, and said so
    assert own.degradations == [0.0, 0.0]
    assert own.gate_facts()["bit_identical"] is True
    # the untrained copy is near uniform over the 256 bytes, and fails the 5% gate by far
    assert own.control.train_tokens == 0
    assert own.control.ppl > 150.0
    assert own.control_degradation > 1.0


def test_a_baseline_is_trained_once_per_seed_and_shared(trained):
    _, _, own, eager, calls, _ = trained
    assert sorted(calls) == sorted([
        ("transformer:tiny", 0), ("transformer:tiny", 1),  # the baseline
        ("transformer:tiny", 0), ("transformer:tiny", 1),  # transformer:tiny as the model
        ("transformer-eager:tiny", 0), ("transformer-eager:tiny", 1),
    ])
    assert eager.baseline_runs == own.baseline_runs
    # the same function with materialised attention: equal up to rounding, well inside the gate
    assert abs(eager.degradation) < 0.05


def test_histories_are_written_for_the_report(trained):
    _, runs, _, _, _, root = trained
    history = json.loads((root / "history" / "history.json").read_text())
    assert set(history) == {
        f"{spec} seed{s} {role}" for s in (0, 1)
        for spec, role in (("transformer:tiny", "baseline"), ("transformer:tiny", "model"),
                           ("transformer-eager:tiny", "model"))
    }
    rows = history["transformer:tiny seed0 baseline"]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert "val_loss" in rows[-1]
    listed = json.loads((root / "history" / "runs.json").read_text())
    assert len(listed) == 6 and all(r["ppl"] > 1 for r in listed)
    assert runs.facts()["tokenizer"] == "bytes"


@pytest.mark.slow
def test_runs_trained_in_parallel_processes_match_the_serial_runs(trained, tmp_path):
    settings, _, own, _, _, _ = trained
    lines = []
    parallel = GateRuns(replace(settings, train_jobs=2, train_dir=str(tmp_path / "runs")),
                        history_dir=tmp_path / "history", say=lines.append)
    assert parallel.plan(["transformer:tiny"]) == 4
    cmp = parallel.compare("transformer:tiny")
    assert any("4 runs, 2 at a time, on cpu" in line for line in lines)
    assert sum("done" in line for line in lines) == 4
    # each run is the serial run of its seed, trained in another process (thread counts may
    # differ, so equal up to float rounding)
    for ours, theirs in zip((*cmp.model_runs, *cmp.baseline_runs),
                            (*own.model_runs, *own.baseline_runs), strict=True):
        assert (ours.seed, ours.role) == (theirs.seed, theirs.role)
        assert ours.ppl == pytest.approx(theirs.ppl, rel=1e-3)
    assert parallel.facts()["train_jobs"] == 2
    history = json.loads((tmp_path / "history" / "history.json").read_text())
    assert len(history) == 4
    parallel.close()


def test_train_jobs_must_be_auto_or_a_positive_integer(tmp_path):
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ValueError, match="--train-jobs must be auto or an integer ≥ 1"):
            tiny_settings(tmp_path, train_jobs=bad)
    with pytest.raises(argparse.ArgumentTypeError, match="must be auto or an integer ≥ 1"):
        jobs_arg("0")
    assert jobs_arg("auto") == "auto" and jobs_arg("3") == 3


def test_auto_train_jobs_is_one_off_cuda_and_up_to_eight_on_it(tmp_path, monkeypatch):
    assert tiny_settings(tmp_path).train_jobs == "auto"
    assert tiny_settings(tmp_path).jobs == 1  # the CPU
    assert tiny_settings(tmp_path, train_jobs=3).jobs == 3
    cuda = replace(tiny_settings(tmp_path), device="cuda")
    for cores, jobs in ((2, 1), (6, 3), (16, 8), (128, 8)):
        monkeypatch.setattr("os.cpu_count", lambda c=cores: c)
        assert cuda.jobs == jobs


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """transformer:tiny against itself and transformer-eager:tiny against it, each trained at an
    absurd rate (1e-9: the weights barely move) and a sound one, with the training runs and the
    checkpoints scored on test."""
    root = tmp_path_factory.mktemp("sweep")
    settings = tiny_settings(write_corpus(root / "corpus"), seq_len=32, train_tokens=32 * 4 * 10,
                             lr_sweep=(1e-9, 1e-2), train_dir=str(root / "runs"))
    said = []
    runs = GateRuns(settings, history_dir=root / "history", say=said.append)
    calls, tested = [], []
    real_train, real_score = muse.training.train.train, muse.training.quality.score_checkpoint

    def counting(cfg):
        calls.append((cfg.model, cfg.seed, cfg.lr))
        return real_train(cfg)

    def scoring(path, *args, **kw):
        tested.append(Path(path).parent.name)
        return real_score(path, *args, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(muse.training.train, "train", counting)
    mp.setattr(muse.training.quality, "score_checkpoint", scoring)
    try:
        own = runs.compare("transformer:tiny")
        eager = runs.compare("transformer-eager:tiny")
    finally:
        mp.undo()
    return settings, own, eager, calls, tested, root, said


def test_the_sweep_scores_only_the_rate_with_the_best_valid_loss(swept):
    settings, own, eager, _, tested, root, said = swept
    history = json.loads((root / "history" / "history.json").read_text())
    tokens = settings.steps * settings.tokens_per_step
    for run in (*own.model_runs, *own.baseline_runs, *eager.model_runs):
        assert run.lr_tried == (1e-9, 1e-2)
        absurd, sound = run.lr_valid_loss
        assert absurd > 5.0 > 4.0 > sound  # ≈ ln 256 (untrained) against a trained model
        assert run.lr == 1e-2 and run.config["lr"] == 1e-2
        # the losses that decided are the runs' own final validation losses
        for lr, loss in zip(run.lr_tried, run.lr_valid_loss, strict=True):
            label = f"{run.spec} seed{run.seed} {run.role} lr{lr:g}"
            assert history[label][-1]["val_loss"] == loss
        assert run.train_tokens == tokens
        assert run.budget_tokens == 2 * tokens == settings.budget_tokens
    # every run chose 1e-2, the top of the grid: each (model, seed, side) is named once
    edge = [line for line in said if "an edge of the swept rates 1e-09, 0.01" in line]
    assert len(edge) == len({(r.spec, r.seed, r.role)
                             for r in (*own.model_runs, *own.baseline_runs, *eager.model_runs)})
    assert "transformer:tiny seed 0 (model) trained best at lr 0.01" in " ".join(edge)
    # one test score per (model, seed, side), each from the run at the chosen rate
    assert sorted(tested) == sorted(
        f"{name}-seed{s}-{role}-lr0.01" for s in (0, 1)
        for name, role in (("transformer-tiny", "baseline"), ("transformer-tiny", "model"),
                           ("transformer-eager-tiny", "model")))
    assert (root / "runs" / "transformer-tiny-seed0-baseline-lr1e-09" / "final.pt").is_file()


def test_the_sweep_shares_baselines_and_keeps_the_checks(swept):
    settings, own, eager, calls, _, _, _ = swept
    runs = [(spec, s, lr) for s in (0, 1) for lr in (1e-9, 1e-2)
            for spec in ("transformer:tiny", "transformer:tiny", "transformer-eager:tiny")]
    assert sorted(calls) == sorted(runs)  # the baseline trained once per (seed, rate)
    assert eager.baseline_runs == own.baseline_runs
    assert own.degradations == [0.0, 0.0]  # the self-comparison: identical runs on the CPU
    assert own.control.train_tokens == own.control.budget_tokens == 0 and own.control.lr is None
    assert own.control.ppl > 150.0 and own.control_degradation > 1.0
    assert settings.describe()["rates"] == [1e-9, 1e-2]
    assert settings.describe()["budget_tokens"] == 2 * settings.train_tokens


def test_the_control_is_the_trainers_initialisation(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = TrainConfig(model="transformer:tiny", corpus=str(corpus), tokenizer="bytes", seq_len=16,
                      batch_size=2, steps=1, lr=0.0, min_lr=0.0, warmup_steps=0, seed=5,
                      eval_tokens=64, out_dir=str(tmp_path / "run"), device="cpu",
                      progress=False)
    train(cfg)  # one step at lr 0 leaves the initial weights
    ckpt = torch.load(tmp_path / "run" / "final.pt", weights_only=False)
    copy = untrained_copy(ckpt, "cpu").state_dict()
    assert copy.keys() == ckpt["model"].keys()
    for name, tensor in ckpt["model"].items():
        assert torch.equal(copy[name], tensor), name


def _checkpoints(root: Path, spec: str, role: str, seeds=(0, 1)):
    name = spec.replace(":", "-")
    return tuple((spec, str(root / "runs" / f"{name}-seed{s}-{role}" / "final.pt"))
                 for s in seeds)


def test_checkpoint_mode_scores_the_trained_checkpoints_the_same(trained):
    settings, _, _, eager, _, root = trained
    ckpts = (*_checkpoints(root, "transformer-eager:tiny", "model"),
             *_checkpoints(root, "transformer:tiny", "baseline"))
    loaded = GateRuns(replace(settings, checkpoints=ckpts, train_dir=None))
    cmp = loaded.compare("transformer-eager:tiny")
    assert cmp.mode == "checkpoint"
    assert [r.ppl for r in cmp.model_runs] == [r.ppl for r in eager.model_runs]
    assert [r.ppl for r in cmp.baseline_runs] == [r.ppl for r in eager.baseline_runs]
    assert cmp.control.ppl == eager.control.ppl
    assert [r.train_tokens for r in cmp.model_runs] == [r.train_tokens for r in eager.model_runs]


def test_checkpoint_mode_refuses_unpaired_or_unequal_runs(trained, tmp_path):
    settings, _, _, _, _, root = trained
    model = _checkpoints(root, "transformer-eager:tiny", "model")
    base = _checkpoints(root, "transformer:tiny", "baseline")

    def compare(*ckpts):
        GateRuns(replace(settings, checkpoints=ckpts)).compare("transformer-eager:tiny")

    with pytest.raises(ValueError, match=r"have seeds \[0, 1\] and those of transformer:tiny"):
        compare(*model, base[0])
    with pytest.raises(ValueError, match="share a seed"):
        compare(model[0], model[0], *base)
    with pytest.raises(ValueError, match="names a checkpoint of another model"):
        compare(model[0], ("transformer-eager:tiny", base[1][1]), *base)
    ckpt = torch.load(base[1][1], weights_only=False)
    ckpt["step"] -= 1
    shorter = tmp_path / "shorter.pt"
    torch.save(ckpt, shorter)
    with pytest.raises(ValueError, match=r"training tokens \(10240 against 9984\)"):
        compare(*model, base[0], ("transformer:tiny", str(shorter)))


@pytest.fixture(scope="module")
def other_recipe(trained):
    """transformer:tiny seed 1, trained on the same corpus and tokens as the baseline runs of
    `trained` but with another recipe: lr 3e-5 (not 3e-3), 32 × 8 windows (not 64 × 4), bf16
    (not fp32)."""
    settings, _, _, _, _, root = trained
    other = replace(settings, lr=3e-5, seq_len=32, batch_size=8, dtype="bf16")
    assert other.steps * other.tokens_per_step == settings.steps * settings.tokens_per_step
    out = root / "runs" / "other-recipe"
    train(other.train_config("transformer:tiny", 1, out))
    return out / "final.pt"


def test_checkpoint_mode_refuses_a_pair_trained_with_another_recipe(trained, other_recipe):
    settings, _, _, _, _, root = trained
    model = _checkpoints(root, "transformer-eager:tiny", "model")
    base = _checkpoints(root, "transformer:tiny", "baseline")
    runs = GateRuns(replace(settings, checkpoints=(*model, base[0],
                                                   ("transformer:tiny", str(other_recipe)))))
    with pytest.raises(ValueError) as info:
        runs.compare("transformer-eager:tiny")
    message = str(info.value)
    assert str(other_recipe) in message and "one recipe" in message
    for named in ("lr (0.003 against 3e-05)", "min_lr (0.0003 against 3e-06)",
                  "seq_len (64 against 32)", "batch_size (4 against 8)",
                  "dtype ('fp32' against 'bf16')"):
        assert named in message
    assert "training tokens" not in message  # the same: 40 steps of 4 × 64 or of 8 × 32


def _edit(src: str, dest: Path, edit) -> str:
    ckpt = torch.load(src, weights_only=False)
    edit(ckpt)
    torch.save(ckpt, dest)
    return str(dest)


def _set_config(**values):
    return lambda ckpt: ckpt["config"].update(values)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_set_config(warmup_steps=7), ["warmup_steps (2 against 7)"]),
        (_set_config(steps=80), ["steps (40 against 80)"]),  # the step 40 of a longer schedule
        (_set_config(weight_decay=0.0), ["weight_decay (0.1 against 0)"]),
        (_set_config(batch_size=2, grad_accum=2),
         ["batch_size (4 against 2)", "grad_accum (1 against 2)"]),
        (lambda ckpt: ckpt.__setitem__("step", 39), ["training tokens (10240 against 9984)"]),
        (lambda ckpt: ckpt["corpus"].update(sha256="c" * 64), ["corpus hash"]),
        (lambda ckpt: ckpt["tokenizer"].update(sha256="b" * 64), ["tokenizer hash"]),
    ],
    ids=["warmup", "schedule-length", "weight-decay", "accumulation", "tokens", "corpus",
         "tokenizer"],
)
@pytest.mark.parametrize("side", ["baseline", "model"])
def test_checkpoint_mode_names_every_recipe_field_that_differs(trained, tmp_path, edit, named,
                                                               side):
    """Every run of a comparison shares one recipe: the model's other seed as much as its
    baseline."""
    settings, _, _, _, _, root = trained
    model = list(_checkpoints(root, "transformer-eager:tiny", "model"))
    base = list(_checkpoints(root, "transformer:tiny", "baseline"))
    runs = base if side == "baseline" else model
    runs[1] = (runs[1][0], _edit(runs[1][1], tmp_path / "edited.pt", edit))
    gate = GateRuns(replace(settings, checkpoints=(*model, *base)))
    with pytest.raises(ValueError) as info:
        gate.compare("transformer-eager:tiny")
    message = str(info.value)
    assert "edited.pt" in message and "one recipe" in message
    for text in named:
        assert text in message

# --- progress ---------------------------------------------------------------------------------


def test_progress_counts_the_runs_and_estimates_the_time_left(tmp_path):
    lines = []
    progress = GateProgress(lines.append, planned=3)
    settings = tiny_settings(tmp_path)
    for what, seconds in (("a seed 0 (baseline)", 10.0), ("b seed 0 (model)", 20.0),
                          ("c seed 0 (model)", 30.0)):
        progress.started(what, settings)
        progress.finished(what, 10240, seconds, 3.25)
    assert lines == [
        "perplexity gate: run 1/3: training a seed 0 (baseline): 10,240 tokens in 40 steps of "
        "4×64, fp32, on cpu",
        "perplexity gate: run 1/3 done: a seed 0 (baseline) in 10 s (1,024 tokens/s), final "
        "valid loss 3.2500; 10,240 tokens trained so far; 2 runs left, training ETA ≈ 20 s",
        "perplexity gate: run 2/3: training b seed 0 (model): 10,240 tokens in 40 steps of "
        "4×64, fp32, on cpu",
        # the runs left × the mean run so far: 1 × (10 + 20) / 2
        "perplexity gate: run 2/3 done: b seed 0 (model) in 20 s (512 tokens/s), final valid "
        "loss 3.2500; 20,480 tokens trained so far; 1 run left, training ETA ≈ 15 s",
        "perplexity gate: run 3/3: training c seed 0 (model): 10,240 tokens in 40 steps of "
        "4×64, fp32, on cpu",
        "perplexity gate: run 3/3 done: c seed 0 (model) in 30 s (341 tokens/s), final valid "
        "loss 3.2500; 30,720 tokens trained so far",
    ]
    # 8 runs at once: the runs left share the slots, 17 × 35 s / 8
    parallel = GateProgress(lines.append, planned=18, parallel=8)
    parallel.finished("t seed 1 (baseline)", 10240, 35.0, 3.25)
    assert lines[-1].endswith("17 runs left, training ETA ≈ 1 min 14 s")
    assert [duration(s) for s in (0.4, 59.6, 61, 3599, 3660)] == [
        "0 s", "1 min 00 s", "1 min 01 s", "59 min 59 s", "1 h 01 min"]


def test_the_plan_counts_shared_baselines_once(tmp_path):
    runs = GateRuns(tiny_settings(tmp_path, lr_sweep=(1e-3, 1e-2)), say=lambda line: None)
    # transformer:tiny's baseline is itself, trained once as the baseline and once as the model;
    # transformer-eager:tiny shares that baseline: 3 runs per seed and rate, × 2 seeds × 2 rates
    assert runs.plan(["transformer:tiny", "transformer-eager:tiny"]) == 12
    assert runs.progress.planned == 12
    ckpts = tiny_settings(tmp_path, checkpoints=(("transformer:tiny", "a.pt"),))
    assert GateRuns(ckpts).plan(["transformer:tiny"]) == 0


def test_the_bench_shows_each_training_run_on_the_terminal(pytester):
    """Through pytest's output capture, in a real (tiny) session: the lines come as the runs
    start and end, counted against the runs the collected tests need."""
    shutil.copy(REPO / "bench" / "test_perplexity.py", pytester.path / "test_perplexity.py")
    corpus = write_corpus(pytester.path / "corpus")
    result = pytester.runpytest("-p", "no:cacheprovider", "--no-results", "--model",
                                "transformer:tiny", "--device", "cpu", "--corpus", str(corpus),
                                "--tokenizer", "bytes", "--train-tokens", str(64 * 4 * 10),
                                "--train-seq", "64", "--train-batch", "4", "--train-lr", "3e-3",
                                "--train-dtype", "fp32")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "perplexity gate: run 1/4: training transformer:tiny seed 0 (baseline): 2,560 tokens in "
        "10 steps of 4×64, fp32, on cpu",
        "perplexity gate: run 1/4 done: transformer:tiny seed 0 (baseline) in * s (* tokens/s), "
        "final valid loss *; 2,560 tokens trained so far; 3 runs left, training ETA ≈ * s",
        "perplexity gate: run 2/4: training transformer:tiny seed 1 (baseline)*",
        "perplexity gate: run 3/4: training transformer:tiny seed 0 (model)*",
        "perplexity gate: run 4/4 done: transformer:tiny seed 1 (model) in * s (* tokens/s), "
        "final valid loss *; 10,240 tokens trained so far",
    ])


# --- the bench file, against canned comparisons -----------------------------------------------

FAKE_RUNS = """
import pytest
from muse.training.quality import Comparison, Scored

PPLS = {ppls!r}

RECALL = {{"model": 3.0, "baseline": 2.0, "control": 1.0}}  # PPL on recall tokens / PPL
LR = {{"model": (1e-3, 2e-3), "baseline": (3e-3, 3e-3), "control": (None, None)}}

def scored(seed, ppl, role):
    return Scored(spec="transformer:tiny", seed=seed, role=role, ppl=ppl, bits_per_byte=ppl / 10,
                  ppl_recall=ppl * RECALL[role], ppl_other=ppl * 0.8, recall_fraction=0.25,
                  tokens_scored=9, bytes_scored=9, params=1, train_tokens=100,
                  lr=LR[role][seed], budget_tokens=300, train_seconds=None,
                  train_tokens_per_s=None, source="canned", lr_tried=(1e-3, 2e-3, 3e-3),
                  lr_valid_loss=(2.0, 1.5, 1.7))

class Canned:
    history_dir = None

    def facts(self):
        return {{"tokenizer": "bytes", "tokenizer_sha256": "0" * 64, "mode": "trained"}}

    def compare(self, spec):
        return Comparison(spec, "transformer:tiny", "trained",
                          tuple(scored(s, p, "model") for s, p in enumerate(PPLS["model"])),
                          tuple(scored(s, p, "baseline") for s, p in enumerate(PPLS["baseline"])),
                          scored(0, PPLS["control"], "control"))

@pytest.fixture(scope="session")
def quality_runs():
    return Canned()
"""


def run_bench(pytester, ppls):
    pytester.makeconftest(FAKE_RUNS.format(ppls=ppls))
    shutil.copy(REPO / "bench" / "test_perplexity.py", pytester.path / "test_perplexity.py")
    corpus = write_corpus(pytester.path / "corpus")  # checked to exist, never read here
    result = pytester.runpytest("-p", "no:cacheprovider", "--results",
                                str(pytester.path / "results"), "--model", "transformer:tiny",
                                "--device", "cpu", "--corpus", str(corpus))
    records = json.loads((pytester.path / "results" / "latest.json").read_text())["records"]
    return result, {r["metric"]: r for r in records}


def test_bench_records_a_pass(pytester):
    result, records = run_bench(pytester, {"model": [10.2, 9.9], "baseline": [10.0, 10.0],
                                           "control": 250.0})
    result.assert_outcomes(passed=1)
    assert list(records) == [
        "ppl", "baseline_ppl", "ppl_degradation", "bits_per_byte", "baseline_bits_per_byte",
        "ppl_recall", "baseline_ppl_recall", "ppl_degradation_recall",
        "ppl_other", "baseline_ppl_other", "ppl_degradation_other", "recall_fraction",
        "lr", "train_budget_tokens", "baseline_lr", "baseline_train_budget_tokens",
        "control_ppl", "control_degradation"]
    # each record names the precision and batch the gate trained and scored with, not the
    # criteria's --dtype fp16 and --batch 1
    assert {(r["dtype"], r["batch"]) for r in records.values()} == {("bf16", 16)}
    gate = records["ppl_degradation"]
    assert gate["value"] == pytest.approx((0.02 - 0.01) / 2)
    assert (gate["threshold"], gate["comparison"], gate["status"]) == (0.05, "<", "PASS")
    assert gate["extra"]["tokenizer"] == "bytes" and gate["extra"]["baseline"] == "transformer:tiny"
    assert records["ppl"]["value"] == pytest.approx(10.05)
    assert records["control_degradation"]["value"] == pytest.approx(24.0)
    assert records["control_degradation"]["status"] == "PASS"
    # the recall / other split, each part's degradation the mean of its per-seed ratios
    assert records["ppl_recall"]["value"] == pytest.approx(3.0 * 10.05)
    assert records["baseline_ppl_recall"]["value"] == pytest.approx(20.0)
    recall = records["ppl_degradation_recall"]
    assert recall["value"] == pytest.approx((30.6 / 20 + 29.7 / 20) / 2 - 1)
    assert recall["extra"]["per_seed"] == pytest.approx({"0": 30.6 / 20 - 1, "1": 29.7 / 20 - 1})
    assert recall["status"] == "RECORDED" and recall["extra"]["summary"] is True
    assert records["ppl_other"]["value"] == pytest.approx(0.8 * 10.05)
    assert records["ppl_degradation_other"]["value"] == pytest.approx(gate["value"])
    assert records["recall_fraction"]["value"] == 0.25
    # the rates (a geometric mean over seeds) and the budget, tokens × rates, per side
    lr = records["lr"]
    assert lr["value"] == pytest.approx(2**0.5 * 1e-3)
    assert lr["extra"]["lr_per_seed"] == {"0": 1e-3, "1": 2e-3}
    assert lr["extra"]["lr_tried"] == [1e-3, 2e-3, 3e-3]
    assert lr["extra"]["lr_valid_loss"] == {"0": [2.0, 1.5, 1.7], "1": [2.0, 1.5, 1.7]}
    assert lr["extra"]["lr_at_edge"] == [0]  # seed 0 chose 1e-3, the grid's bottom
    assert records["baseline_lr"]["extra"]["lr_at_edge"] == [0, 1]  # 3e-3: its top
    assert records["baseline_lr"]["value"] == pytest.approx(3e-3)
    budget = records["train_budget_tokens"]
    assert (budget["value"], budget["unit"], budget["extra"]["rates"]) == (300, "tokens", 3)
    assert records["baseline_train_budget_tokens"]["value"] == 300


def test_the_report_labels_the_new_metrics(pytester):
    from muse.harness.results import Record
    from muse.report.render import LABELS, TABLES, build_table, record_frame

    _, records = run_bench(pytester, {"model": [10.2, 9.9], "baseline": [10.0, 10.0],
                                      "control": 250.0})
    (spec,) = [t for t in TABLES if t.name == "perplexity"]
    table = build_table(spec, record_frame([Record.from_dict(r) for r in records.values()]))
    assert all(m in LABELS for m in table.metrics)  # every metric the gate records has a label
    assert {"PPL recall", "degradation other", "recall tokens", "lr",
            "training tokens/seed"} <= set(table.headers)
    ((model, _, cells),) = table.rows
    text = dict(zip(table.metrics, (c.text for c in cells), strict=True))
    assert text["train_budget_tokens"] == "300 tokens"
    assert text["ppl_degradation_recall"] == "0.5075"


def test_bench_fails_a_degraded_model(pytester):
    result, records = run_bench(pytester, {"model": [11.0, 10.8], "baseline": [10.0, 10.0],
                                           "control": 250.0})
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: ppl_degradation = 0.09 (needs < 0.05): FAIL*"])
    assert records["ppl_degradation"]["status"] == "FAIL"


def test_bench_fails_when_the_untrained_control_passes(pytester):
    result, records = run_bench(pytester, {"model": [10.0, 10.0], "baseline": [10.0, 10.0],
                                           "control": 10.1})
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the negative control passed the gate*harness itself is broken*"])
    assert records["control_degradation"]["status"] == "FAIL"


def test_baseline_is_matched_at_the_tokenizers_vocabulary():
    from muse.training.quality import baseline_spec, check_matched, nominal_vocab

    assert nominal_vocab("bpe:8192") == 8192 and nominal_vocab("gpt2") == 50257
    assert baseline_spec("phase1:10gb", 8192) == "transformer:phase1-10gb-v8k"
    assert baseline_spec("phase1:10gb") == "transformer:phase1-10gb"
    ours, theirs = check_matched("phase1:10gb", "transformer:phase1-10gb-v8k", 8192)
    assert abs(theirs / ours - 1) < 0.10
    # the preset matched at 50257 tokens is 2.4× too small at 8192: refused, with both counts
    with pytest.raises(ValueError, match=r"not matched.*8192-token.*parameters"):
        check_matched("phase1:10gb", "transformer:phase1-10gb", 8192)


def test_also_corpora_score_the_same_checkpoints_through_the_gates_tokenizer(trained, tmp_path):
    settings, runs, own, _, _, root = trained
    other = tmp_path / "other"
    other.mkdir()
    for split, seed in (("train", 5), ("valid", 6), ("test", 7)):
        (other / f"{split}.txt").write_text(_text(seed, 6).upper(), encoding="utf-8")
    with_also = GateRuns(replace(settings, also=(str(other),)), history_dir=tmp_path / "h")
    (there,) = with_also.also_splits()
    assert there.corpus == "other" and there.tokenizer_sha256 == runs.split().tokenizer_sha256
    path = root / "runs" / "transformer-tiny-seed0-model" / "final.pt"
    got = score_checkpoint(path, "model", runs.split(), settings, also=(there,))
    model, _ = load_model(path, torch.device("cpu"))
    want = score(model, there, settings)
    assert got.also == {"other": {"ppl": want.ppl, "bits_per_byte": want.bits_per_byte}}
    assert got.ppl == own.model_runs[0].ppl  # the gate's own split is scored as before
    assert got.also["other"]["ppl"] != got.ppl
    assert own.also == [] and own.model_runs[0].also == {}


def test_a_missing_also_corpus_is_named(tmp_path):
    runs = GateRuns(tiny_settings(write_corpus(tmp_path / "c"), also=(str(tmp_path / "nowhere"),)))
    with pytest.raises(ValueError, match="nowhere"):
        runs.also_splits()


def test_the_gates_tf32_setting_reaches_its_runs_and_their_recipe(tmp_path):
    """TF32 on by default, as in training; off on request."""
    settings = tiny_settings(tmp_path, tf32=False)
    assert settings.train_config("transformer:tiny", 0, tmp_path / "run").tf32 is False
    assert tiny_settings(tmp_path).train_config("transformer:tiny", 0, tmp_path).tf32 is True
    assert TrainConfig(model="transformer:tiny").tf32 is True
    assert settings.describe()["tf32"] is False
    old = {"config": {"batch_size": 4, "seq_len": 64, "grad_accum": 1}, "step": 2,
           "tokenizer": {"sha256": "t"}, "corpus": {"sha256": "c"}}
    assert muse.training.quality.checkpoint_recipe(old)["tf32"] is False
