"""The equal-budget perplexity gate: a model against the `transformer` of matched size.

Both sides are trained here by `muse.training.train` with one recipe (corpus, tokenizer, token
budget, sequence length, batch, learning-rate schedule, precision, seeds), or both loaded from
checkpoints the trainer wrote, refused unless every one has the same recipe (`checkpoint_recipe`)
and the two sides the same seeds; then both are scored on the test split with the sliding-window
perplexity of `muse.measure.perplexity`. The two runs of a seed share the initialisation seed
and the data order, so the degradation is taken per seed, PPL_model[s] / PPL_baseline[s] − 1,
and gated on its mean over seeds; its spread over seeds is reported beside it.

With a learning-rate sweep (`lr_sweep`, `--lr-sweep`) every model and baseline trains once per rate
and seed; the run with the lowest final validation loss is the one scored on test, so each side
gets its own best rate and a shared rate can neither hide nor invent a gap. The budget a model
spent (training tokens × rates) is stated beside its score.

The scored loss is also split into recall tokens and the rest (`muse.measure.perplexity`), with
a degradation for each part, to show where a model loses to the transformer.

The harness checks itself with a negative control: an untrained copy of the model (the
trainer's initialisation for the first seed, zero steps) must fail the same gate against the
trained baseline. When it passes, the gate cannot tell training from no training, and no
verdict of the run means anything.

A baseline is trained once per (spec, seed, rate) in a session and shared by every model matched to
it. When the model is the baseline itself (`transformer:small` against `transformer:small`) its
side is trained as runs of its own with the same seeds, so the comparison measures run-to-run
noise: on CUDA the kernels are not bit-deterministic and the two runs drift apart; on the CPU
they are identical and the degradation is exactly 0.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from muse import models
from muse.devices import float32_matmuls
from muse.errors import MuseError
from muse.fileio import atomic_write_text
from muse.measure.perplexity import evaluate_perplexity, scored_bytes
from muse.measure.phases import DTYPES, autocast, torch_dtype
from muse.training.checkpoint import load_checkpoint
from muse.training.data import (
    CORPUS_FORMS,
    WIKITEXT,
    get_tokenizer,
    load_corpus,
    parse_tokenizer_name,
)

DEFAULT_CORPUS = "../shared/data/wiki-mini"
SELF_COMPARISON_NOTE = (
    "the model is its own baseline: its side is trained as separate runs with the same seeds, "
    "so the degradation is run-to-run noise (CUDA kernels are not bit-deterministic; on the CPU "
    "the runs are identical and it is exactly 0)"
)


# ------------------------------------------------------------------------- option parsing


def tokenizer_arg(text: str) -> str:
    """argparse type for --tokenizer."""
    try:
        parse_tokenizer_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def jobs_arg(text: str) -> int | str:
    """--train-jobs: "auto" or a positive integer."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be auto or an integer ≥ 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type for --seeds."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or str(value) != text.strip().lstrip("+"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return value


def checkpoint_arg(text: str) -> tuple[str, str]:
    """argparse type for --checkpoint NAME=PATH → ("name:preset", path)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=PATH (a registered model and a checkpoint the trainer "
            "wrote, e.g. phase2:small=runs/p2/final.pt)"
        )
    try:
        spec = ":".join(models.resolve(name.strip()))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if not Path(path).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: checkpoint {path!r} is not a file")
    return spec, path


def check_corpus_exists(spec: str) -> None:
    """A local corpus that is not there is a usage error before any training starts."""
    if spec in WIKITEXT or Path(spec).expanduser().exists():
        return
    raise ValueError(f"--corpus {spec!r} does not exist; valid: {CORPUS_FORMS}")


# ------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class QualitySettings:
    """The gate's recipe and evaluation, from the command line (muse.harness.plugin)."""

    corpus: str = DEFAULT_CORPUS
    tokenizer: str = "bpe:8192"
    # per training run; steps = train_tokens // (batch · seq); sized so the design-card run fits
    # its time budget (README: the design-card run)
    train_tokens: int = 4_194_304
    seq_len: int = 512
    batch_size: int = 16
    lr: float = 1e-3  # peak; cosine to lr/10, warmup over the first 5% of steps
    dtype: str = "bf16"  # autocast of training and scoring
    tf32: bool = True  # CUDA float32 matmuls may use TF32 in training and scoring (TrainConfig)
    device: str = "cpu"
    seeds: tuple[int, ...] = (0, 1)
    context: int | None = None  # scoring window; None: seq_len
    stride: int | None = None  # None: context // 2
    checkpoints: tuple[tuple[str, str], ...] = ()  # (spec, path); any: checkpoint mode
    train_dir: str | None = None  # checkpoints of the runs; None: a temporary folder
    val_tokens: int = 32768  # validation tokens the trainer scores for its loss curves
    lr_sweep: tuple[float, ...] = ()  # peak rates each run trains at; (): `lr` alone
    # more corpora whose test splits score the same checkpoints, through the gate's tokenizer
    also: tuple[str, ...] = ()
    # training runs at once, each in its own process, spread over the GPUs (several may share
    # one: a small model's step leaves most of a GPU idle); 1: one after another, in-process;
    # "auto": `jobs` decides
    train_jobs: int | str = "auto"

    def __post_init__(self) -> None:
        parse_tokenizer_name(self.tokenizer)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds lists a seed twice: {' '.join(map(str, self.seeds))}")
        if not self.checkpoints and len(self.seeds) < 2:
            raise ValueError(
                f"--seeds needs at least 2 seeds for a spread over seeds, got "
                f"{' '.join(map(str, self.seeds)) or 'none'}; e.g. --seeds 0 1"
            )
        bad = [r for r in self.lr_sweep if not (isinstance(r, (int, float)) and 0 < r < math.inf)]
        if bad:
            raise ValueError(f"--lr-sweep: {bad[0]!r} is not a positive finite learning rate")
        if len(set(self.lr_sweep)) != len(self.lr_sweep):
            raise ValueError(f"--lr-sweep lists a rate twice: {' '.join(map(str, self.lr_sweep))}")
        if self.lr_sweep and self.checkpoints:
            raise ValueError("--lr-sweep and --checkpoint exclude each other: checkpoints are "
                             "scored as they were trained")
        if self.train_jobs != "auto" and (isinstance(self.train_jobs, bool) or not isinstance(
                self.train_jobs, int) or self.train_jobs < 1):
            raise ValueError(f"--train-jobs must be auto or an integer ≥ 1, got "
                             f"{self.train_jobs!r}")
        if self.seq_len < 2:
            raise ValueError(f"--train-seq must be ≥ 2 (one token to predict), got {self.seq_len}")
        if self.steps < 1:
            raise ValueError(
                f"--train-tokens {self.train_tokens} is less than one step of --train-batch "
                f"{self.batch_size} × --train-seq {self.seq_len} = {self.tokens_per_step} tokens"
            )
        if self.eval_context < 2:
            raise ValueError(f"--ppl-context must be ≥ 2, got {self.eval_context}")
        if not 1 <= self.eval_stride <= self.eval_context:
            raise ValueError(
                f"--ppl-stride must be in [1, --ppl-context {self.eval_context}], "
                f"got {self.eval_stride}"
            )

    @property
    def jobs(self) -> int:
        """Runs trained at once: `train_jobs`, where "auto" is 1 off CUDA and on CUDA 8 (fewer
        with fewer than 16 CPU cores: each run's host side needs about two)."""
        if self.train_jobs != "auto":
            return self.train_jobs
        if self.device != "cuda" or self.checkpoints:
            return 1
        return max(1, min(8, (os.cpu_count() or 2) // 2))

    @property
    def mode(self) -> str:
        return "checkpoint" if self.checkpoints else "trained"

    @property
    def rates(self) -> tuple[float, ...]:
        """The peak learning rates every (model, seed) trains at."""
        return self.lr_sweep or (self.lr,)

    @property
    def budget_tokens(self) -> int:
        """Training tokens spent on one model and seed: one run per rate."""
        return self.steps * self.tokens_per_step * len(self.rates)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return self.train_tokens // self.tokens_per_step

    @property
    def eval_context(self) -> int:
        return self.context or self.seq_len

    @property
    def eval_stride(self) -> int:
        return self.stride or max(1, self.eval_context // 2)

    def check_models(self, specs: list[str]) -> None:
        """In checkpoint mode every model and its baseline need checkpoints, and every
        checkpoint must belong to one of them (none is silently unused)."""
        if not self.checkpoints:
            return
        needed = {s: baseline_spec(s, nominal_vocab(self.tokenizer)) for s in specs}
        given = {spec for spec, _ in self.checkpoints}
        for spec, base in needed.items():
            missing = [s for s in dict.fromkeys((spec, base)) if s not in given]
            if missing:
                raise ValueError(
                    f"--checkpoint: {spec} is compared with {base}, so both need checkpoints; "
                    f"none given for {', '.join(missing)}"
                )
        unused = sorted(given - set(needed) - set(needed.values()))
        if unused:
            raise ValueError(
                f"--checkpoint names {', '.join(unused)}, which is neither a --model nor the "
                "baseline of one"
            )

    def train_config(self, spec: str, seed: int, out_dir: Path, lr: float | None = None):
        from muse.training.train import TrainConfig

        steps = self.steps
        lr = self.lr if lr is None else lr
        return TrainConfig(
            model=spec,
            corpus=self.corpus,
            tokenizer=self.tokenizer,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            steps=steps,
            lr=lr,
            min_lr=lr / 10,
            warmup_steps=max(1, steps // 20),
            dtype=self.dtype,
            seed=seed,
            eval_every=max(1, steps // 8),
            eval_tokens=self.val_tokens,
            log_every=max(1, steps // 20),
            out_dir=str(out_dir),
            device=self.device,
            tf32=self.tf32,
            progress=False,
        )

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(mode=self.mode, steps=self.steps, context=self.eval_context,
                 stride=self.eval_stride, seeds=list(self.seeds), rates=list(self.rates),
                 budget_tokens=self.budget_tokens, lr_sweep=list(self.lr_sweep),
                 checkpoints=[f"{s}={p}" for s, p in self.checkpoints])
        if self.checkpoints:  # the recipe is the checkpoints' own
            for key in ("train_tokens", "seq_len", "batch_size", "lr", "steps", "seeds", "rates",
                        "budget_tokens", "lr_sweep", "train_jobs"):
                d.pop(key)
        return d


MAX_SIZE_GAP = 0.10  # a matched baseline is within 10% of the model's parameter count


def nominal_vocab(tokenizer: str) -> int | None:
    """The vocabulary a tokenizer name asks for (a trained BPE may end a few tokens short)."""
    if tokenizer.startswith("bpe:"):
        return int(tokenizer.partition(":")[2])
    return {"bytes": 256, "gpt2": 50257}.get(tokenizer)


def baseline_spec(spec: str, vocab_size: int | None = None) -> str:
    """The transformer matched in size to `spec` at this vocabulary (default: its own)."""
    return ":".join(models.baseline_for(*models.resolve(spec), vocab_size))


def check_matched(spec: str, base: str, vocab_size: int) -> tuple[int, int]:
    """Both built at `vocab_size`; an error when the baseline is not within MAX_SIZE_GAP."""
    with torch.device("meta"):
        ours, theirs = (models.build(*models.resolve(s), vocab_size=vocab_size).num_params()
                        for s in (spec, base))
    if spec != base and abs(theirs / ours - 1) > MAX_SIZE_GAP:
        raise ValueError(
            f"{base} is not matched to {spec} at a {vocab_size}-token vocabulary: {theirs:,} "
            f"against {ours:,} parameters (more than {MAX_SIZE_GAP:.0%} apart)"
        )
    return ours, theirs


# -------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class EvalSplit:
    """The tokenized test split every model is scored on."""

    ids: torch.Tensor
    bytes_scored: int
    tokenizer: str
    tokenizer_sha256: str
    vocab_size: int
    corpus: str
    corpus_sha256: str


def load_eval_split(corpus_spec: str, tokenizer_name: str,
                    tokenizer_corpus: str | None = None) -> EvalSplit:
    """The test split of `corpus_spec`, through the tokenizer built on `tokenizer_corpus` (the
    training corpus; default: this one)."""
    corpus = load_corpus(corpus_spec)
    trained_on = corpus if tokenizer_corpus is None else load_corpus(tokenizer_corpus)
    tokenizer = get_tokenizer(tokenizer_name, trained_on)
    ids = torch.tensor(tokenizer.encode(corpus.splits["test"]), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"the test split of {corpus_spec!r} has {ids.numel()} tokens; "
                         "perplexity needs at least 2")
    return EvalSplit(ids, scored_bytes(tokenizer, ids), tokenizer.name, tokenizer.sha256,
                     tokenizer.vocab_size, corpus.name, corpus.sha256)


@dataclass(frozen=True)
class Scored:
    """One model's perplexity on the test split, and what it was trained on."""

    spec: str
    seed: int
    role: str  # "model", "baseline" or "control"
    ppl: float
    bits_per_byte: float
    ppl_recall: float  # over the recall tokens (muse.measure.perplexity), and the rest
    ppl_other: float
    recall_fraction: float  # of the scored tokens; a property of the text and the windows
    tokens_scored: int
    bytes_scored: int
    params: int  # at the tokenizer's vocabulary
    train_tokens: int  # tokens its weights saw: steps × batch × seq × accumulation
    lr: float | None  # the peak learning rate of its run (None: untrained)
    budget_tokens: int  # training tokens spent to get it: train_tokens × the rates tried
    train_seconds: float | None  # wall time of the training run (None: loaded or untrained)
    train_tokens_per_s: float | None  # the trainer's own step timing, median over steps
    source: str  # the run folder or checkpoint file
    config: dict = field(default_factory=dict, compare=False)
    model_overrides: dict = field(default_factory=dict, compare=False)
    corpus_sha256: str = ""
    lr_tried: tuple[float, ...] = ()  # the rates its model and seed trained at, and the final
    lr_valid_loss: tuple[float | None, ...] = ()  # validation loss (nats/token) of each run
    also: dict = field(default_factory=dict)  # corpus name → {"ppl", "bits_per_byte"} there

    def facts(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("config", "model_overrides")}


def _parts(result) -> dict[str, float]:
    return {"ppl_recall": result.recall_ppl, "ppl_other": result.other_ppl,
            "recall_fraction": result.recall_fraction}


def score(model: torch.nn.Module, split: EvalSplit, settings: QualitySettings):
    """Sliding-window PPL under the training precision (the trainer validates the same way)."""
    device = torch.device(settings.device)
    with autocast(device, torch_dtype(settings.dtype)), float32_matmuls(settings.tf32):
        return evaluate_perplexity(model, split.ids, split.bytes_scored, settings.eval_context,
                                   settings.eval_stride, settings.batch_size, device)


def trained_tokens(ckpt: dict) -> int:
    cfg = ckpt["config"]
    return ckpt["step"] * cfg["batch_size"] * cfg["seq_len"] * cfg["grad_accum"]


# the training config keys that make a recipe: a comparison's runs differ in model and seed only
RECIPE_KEYS = ("lr", "min_lr", "warmup_steps", "steps", "weight_decay", "betas", "clip_norm",
               "seq_len", "batch_size", "grad_accum", "dtype", "tokenizer")


def checkpoint_recipe(ckpt: dict) -> dict[str, Any]:
    """What a checkpoint was trained with, besides its model and seed: the schedule (peak and
    floor rate, warmup, planned steps), optimizer, windows, accumulation, precision, the tokens
    its weights saw, and the tokenizer and corpus by hash."""
    cfg = ckpt["config"]
    recipe = {k: tuple(v) if isinstance(v, list) else v
              for k in RECIPE_KEYS for v in [cfg.get(k)]}
    recipe["tf32"] = bool(cfg.get("tf32", False))  # checkpoints from before the setting: off
    recipe["training tokens"] = trained_tokens(ckpt)
    recipe["tokenizer hash"] = ckpt["tokenizer"]["sha256"]
    recipe["corpus hash"] = ckpt["corpus"]["sha256"]
    return recipe


def _shown(key: str, value: Any) -> str:
    if key.endswith("hash") and isinstance(value, str):
        return value[:12]
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def recipe_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """`key (a's value against b's)` for every field of two recipes that differs."""
    return [f"{k} ({_shown(k, a.get(k))} against {_shown(k, b.get(k))})"
            for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def untrained_copy(ckpt: dict, device: torch.device | str) -> torch.nn.Module:
    """The weights the run of `ckpt` started from: the trainer seeds torch with the run's seed
    and builds the model on the CPU before moving it (muse.training.train.train)."""
    torch.manual_seed(ckpt["config"]["seed"])
    name, preset = models.resolve(ckpt["config"]["model"])
    return models.build(name, preset, **ckpt["model_overrides"]).to(device)


def score_checkpoint(path: Path | str, role: str, split: EvalSplit, settings: QualitySettings,
                     train_seconds: float | None = None,
                     also: tuple[EvalSplit, ...] = ()) -> Scored:
    from muse.training.evaluate import load_model

    model, ckpt = load_model(path, torch.device(settings.device))
    if ckpt["tokenizer"]["sha256"] != split.tokenizer_sha256:
        raise ValueError(
            f"{os.fspath(path)} was trained with tokenizer {ckpt['tokenizer']['name']!r} "
            f"({ckpt['tokenizer']['sha256'][:12]}), but --tokenizer {split.tokenizer!r} on "
            f"--corpus {settings.corpus!r} hashes to {split.tokenizer_sha256[:12]}: pass the "
            "tokenizer and corpus the checkpoint was trained with"
        )
    result = score(model, split, settings)
    elsewhere = {}
    for other in also:
        there = score(model, other, settings)
        elsewhere[other.corpus] = {"ppl": there.ppl, "bits_per_byte": there.bits_per_byte}
    steps = [row["tokens_per_s"] for row in ckpt["history"] if row.get("tokens_per_s")]
    lr = ckpt["config"]["lr"]
    return Scored(
        spec=ckpt["config"]["model"], seed=ckpt["config"]["seed"], role=role, ppl=result.ppl,
        bits_per_byte=result.bits_per_byte, **_parts(result), tokens_scored=result.tokens_scored,
        bytes_scored=result.bytes_scored, params=model.num_params(),
        train_tokens=trained_tokens(ckpt), lr=lr, budget_tokens=trained_tokens(ckpt),
        lr_tried=(lr,), lr_valid_loss=(final_valid_loss(ckpt["history"]),),
        train_seconds=train_seconds,
        train_tokens_per_s=statistics.median(steps) if steps else None, source=os.fspath(path),
        config=ckpt["config"], model_overrides=ckpt["model_overrides"],
        corpus_sha256=ckpt["corpus"]["sha256"], also=elsewhere,
    )


def final_valid_loss(history: list[dict]) -> float | None:
    """The validation loss of a run's last step (the trainer always validates there); None for a
    checkpoint saved between validations."""
    return history[-1].get("val_loss") if history else None


def score_untrained(of: Scored, split: EvalSplit, settings: QualitySettings) -> Scored:
    model = untrained_copy({"config": of.config, "model_overrides": of.model_overrides},
                           settings.device)
    result = score(model, split, settings)
    return Scored(
        spec=of.spec, seed=of.seed, role="control", ppl=result.ppl,
        bits_per_byte=result.bits_per_byte, **_parts(result), tokens_scored=result.tokens_scored,
        bytes_scored=result.bytes_scored, params=model.num_params(), train_tokens=0, lr=None,
        budget_tokens=0, train_seconds=None, train_tokens_per_s=None,
        source=f"untrained copy of {of.source}",
        config=of.config, model_overrides=of.model_overrides, corpus_sha256=of.corpus_sha256,
    )


# ---------------------------------------------------------------------------- degradation


def degradations(model_ppls: list[float], baseline_ppls: list[float]) -> list[float]:
    """Per seed: PPL_model / PPL_baseline − 1 (positive: the model is worse)."""
    if len(model_ppls) != len(baseline_ppls) or not model_ppls:
        raise ValueError(f"need one baseline PPL per model PPL, got {len(model_ppls)} and "
                         f"{len(baseline_ppls)}")
    return [m / b - 1 for m, b in zip(model_ppls, baseline_ppls, strict=True)]


def spread(values: list[float]) -> dict[str, float]:
    return {
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


@dataclass(frozen=True)
class Comparison:
    """A model against its baseline, seed by seed, and the untrained control."""

    model: str
    baseline: str
    mode: str  # "trained" | "checkpoint"
    model_runs: tuple[Scored, ...]  # in seed order, paired with baseline_runs
    baseline_runs: tuple[Scored, ...]
    control: Scored  # the untrained model of the first seed

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.model_runs]

    @property
    def self_comparison(self) -> bool:
        return self.model == self.baseline

    @property
    def degradations(self) -> list[float]:
        return degradations([r.ppl for r in self.model_runs], [r.ppl for r in self.baseline_runs])

    @property
    def degradation(self) -> float:
        return statistics.fmean(self.degradations)

    def part_degradations(self, part: str) -> list[float]:
        """Per seed, the degradation on the recall tokens (part "recall") or the rest ("other")."""
        key = {"recall": "ppl_recall", "other": "ppl_other"}[part]
        return degradations([getattr(r, key) for r in self.model_runs],
                            [getattr(r, key) for r in self.baseline_runs])

    def part_degradation(self, part: str) -> float:
        return statistics.fmean(self.part_degradations(part))

    @property
    def also(self) -> list[str]:
        """The other corpora both sides were scored on."""
        return list(self.model_runs[0].also)

    def also_side(self, corpus: str, role: str) -> dict[str, float]:
        runs = self.model_runs if role == "model" else self.baseline_runs
        return {key: statistics.fmean(r.also[corpus][key] for r in runs)
                for key in ("ppl", "bits_per_byte")}

    def also_degradations(self, corpus: str) -> list[float]:
        return degradations([r.also[corpus]["ppl"] for r in self.model_runs],
                            [r.also[corpus]["ppl"] for r in self.baseline_runs])

    @property
    def control_baseline(self) -> Scored:
        (base,) = [r for r in self.baseline_runs if r.seed == self.control.seed]
        return base

    @property
    def control_degradation(self) -> float:
        return self.control.ppl / self.control_baseline.ppl - 1

    def side(self, role: str) -> dict[str, Any]:
        """Mean PPL and bits per byte of one side, with every run's facts for the record."""
        runs = self.model_runs if role == "model" else self.baseline_runs
        ppls = [r.ppl for r in runs]
        return {
            "ppl": statistics.fmean(ppls),
            "bits_per_byte": statistics.fmean(r.bits_per_byte for r in runs),
            "ppl_spread": spread(ppls),
            "ppl_recall": statistics.fmean(r.ppl_recall for r in runs),
            "ppl_other": statistics.fmean(r.ppl_other for r in runs),
            "recall_fraction": statistics.fmean(r.recall_fraction for r in runs),
            # the rates sit on a log grid: their mean over seeds is geometric
            "lr": math.exp(statistics.fmean(math.log(r.lr) for r in runs)),
            "lr_per_seed": {str(r.seed): r.lr for r in runs},
            "lr_tried": list(runs[0].lr_tried),
            "lr_valid_loss": {str(r.seed): list(r.lr_valid_loss) for r in runs},
            # seeds whose best rate is the lowest or highest swept: the sweep did not bracket it
            "lr_at_edge": [r.seed for r in runs if at_grid_edge(r.lr, r.lr_tried)],
            "budget_tokens": statistics.fmean(r.budget_tokens for r in runs),
            "runs": [r.facts() for r in runs],
        }

    def gate_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "baseline": self.baseline,
            "mode": self.mode,
            "seeds": self.seeds,
            "per_seed": dict(zip(map(str, self.seeds), self.degradations, strict=True)),
            "spread": spread(self.degradations),
            "model_ppl": [r.ppl for r in self.model_runs],
            "baseline_ppl": [r.ppl for r in self.baseline_runs],
        }
        if self.self_comparison:
            base = [r.ppl for r in self.baseline_runs]
            facts["note"] = SELF_COMPARISON_NOTE
            facts["bit_identical"] = facts["model_ppl"] == base
            # how far apart the seeds are, for reading the noise against
            facts["baseline_relative_seed_spread"] = (max(base) - min(base)) / statistics.fmean(
                base)
            if self.mode == "checkpoint":
                facts["note"] = "the same checkpoints on both sides: 0 by construction"
        return facts


# ---------------------------------------------------------------------------- the session


def _label(spec: str, seed: int, role: str) -> str:
    return f"{spec} seed{seed} {role}"


@dataclass(frozen=True)
class SweepRun:
    """One training run of a (model, seed) at one rate, before the choice."""

    lr: float
    out: Path
    valid_loss: float
    seconds: float


def at_grid_edge(lr: float | None, tried) -> bool:
    """Whether `lr` is the lowest or highest of two or more swept rates."""
    return lr is not None and len(tried) > 1 and lr in (min(tried), max(tried))


def best_run(runs: list[SweepRun]) -> SweepRun:
    """The run with the lowest final validation loss; a diverged run (NaN or ∞) is never chosen
    over a finite one. Ties go to the rate listed first."""
    return min(runs, key=lambda r: (not math.isfinite(r.valid_loss), r.valid_loss))


def duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class GateProgress:
    """What the gate says while it trains, through `say` (the plugin writes it to the terminal):
    a line as each training run starts (model, seed, side, tokens, steps) and one as it ends,
    with its time and speed, the tokens trained so far and, once the runs planned are known
    (`planned`), the training time left: the runs left × the mean time of a run so far, shared
    by the runs that train at once (`parallel`)."""

    def __init__(self, say: Callable[[str], None], planned: int | None = None,
                 parallel: int = 1):
        self.say = say
        self.planned = planned
        self.parallel = parallel
        self.seconds: list[float] = []
        self.tokens = 0

    def _number(self) -> str:
        n = len(self.seconds) + 1
        return f"{n}/{self.planned}" if self.planned and n <= self.planned else str(n)

    def started(self, what: str, settings: QualitySettings) -> None:
        self.say(f"perplexity gate: run {self._number()}: training {what}: "
                 f"{settings.steps * settings.tokens_per_step:,} tokens in {settings.steps} "
                 f"steps of {settings.batch_size}×{settings.seq_len}, {settings.dtype}, on "
                 f"{settings.device}")

    def finished(self, what: str, tokens: int, seconds: float, valid_loss: float) -> None:
        number = self._number()
        self.seconds.append(seconds)
        self.tokens += tokens
        line = (f"perplexity gate: run {number} done: {what} in {duration(seconds)} "
                f"({tokens / max(seconds, 1e-9):,.0f} tokens/s), final valid loss "
                f"{valid_loss:.4f}; {self.tokens:,} tokens trained so far")
        left = self.planned - len(self.seconds) if self.planned else None
        if left is not None and left > 0:
            eta = left * statistics.fmean(self.seconds) / min(self.parallel, left)
            line += f"; {left} run{'s' * (left > 1)} left, training ETA ≈ {duration(eta)}"
        self.say(line)


def job_devices(device: str) -> list[str]:
    """The devices parallel training runs go to: every GPU on "cuda", else the one device."""
    if device != "cuda":
        return [device]
    count = torch.cuda.device_count()
    if count == 0:
        raise MuseError("--train-jobs on device 'cuda', but CUDA is not available here")
    return [f"cuda:{i}" for i in range(count)]


def _train_in_child(cfg, threads: int) -> tuple[list, int, float]:
    """One training run in a worker process: (history, steps, seconds)."""
    from muse.training.train import train

    if cfg.device == "cpu":
        torch.set_num_threads(threads)  # the runs at once share the cores
    t0 = time.perf_counter()
    result = train(cfg)
    return result.history, result.step, time.perf_counter() - t0


class GateRuns:
    """The session's runs, each trained (or loaded) and scored once: a baseline shared by
    several models is trained once per seed. Training histories are written under
    `history_dir` (history.json for `muse report --history`, runs.json with each run's
    recipe and scores) as each run ends, so a run cut short keeps the finished ones. With
    `say`, each training run's start and end are told as they happen (GateProgress)."""

    def __init__(self, settings: QualitySettings, history_dir: Path | None = None,
                 say: Callable[[str], None] | None = None):
        self.settings = settings
        self.history_dir = Path(history_dir) if history_dir is not None else None
        self.progress = GateProgress(say) if say is not None else None
        self._split: EvalSplit | None = None
        self._also: tuple[EvalSplit, ...] | None = None
        self._scored: dict[tuple[str, int, str], Scored] = {}
        self._loaded: dict[tuple[str, str], Scored] = {}
        self._heads: dict[str, dict[str, Any]] = {}
        self._histories: dict[str, list] = {}
        self._runs: list[dict] = []
        self._tmp: str | None = None
        self._planned: list[tuple[str, int, str, float]] = []  # (spec, seed, role, lr)
        self._swept: dict[tuple[str, int, str, float], SweepRun] = {}

    def split(self) -> EvalSplit:
        if self._split is None:
            check_corpus_exists(self.settings.corpus)
            self._split = load_eval_split(self.settings.corpus, self.settings.tokenizer)
        return self._split

    def also_splits(self) -> tuple[EvalSplit, ...]:
        """The test splits of `also`, through the gate's tokenizer."""
        if self._also is None:
            for spec in self.settings.also:
                check_corpus_exists(spec)
            self._also = tuple(load_eval_split(spec, self.settings.tokenizer, self.settings.corpus)
                               for spec in self.settings.also)
        return self._also

    def facts(self) -> dict[str, Any]:
        """What every record of the gate carries: the tokenizer and corpus by name and hash."""
        split = self.split()
        return {
            "tokenizer": split.tokenizer,
            "tokenizer_sha256": split.tokenizer_sha256,
            "corpus": split.corpus,
            "corpus_sha256": split.corpus_sha256,
            "context": self.settings.eval_context,
            "stride": self.settings.eval_stride,
            "dtype": self.settings.dtype,
            "mode": self.settings.mode,
            "history": None if self.history_dir is None else str(self.history_dir),
            "train_jobs": 1 if self.settings.checkpoints else self.settings.jobs,
        }

    def _train_root(self) -> Path:
        if self.settings.train_dir is not None:
            return Path(self.settings.train_dir)
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="muse-perplexity-")
        return Path(self._tmp)

    def trained(self, spec: str, seed: int, role: str) -> Scored:
        """Trains `spec` at every rate of the recipe, and scores on test only the run with the
        best final validation loss."""
        key = (spec, seed, role)
        if key not in self._scored:
            split = self.split()  # first: builds (and caches) the tokenizer the trainer uses
            runs = [self._train_at(spec, seed, role, lr) for lr in self.settings.rates]
            chosen = best_run(runs)
            if self.progress is not None and at_grid_edge(chosen.lr, self.settings.rates):
                self.progress.say(f"perplexity gate: {spec} seed {seed} ({role}) trained best at "
                                  f"lr {chosen.lr:g}, an edge of the swept rates "
                                  f"{', '.join(f'{r:g}' for r in self.settings.rates)}: the "
                                  "sweep does not bracket its best rate")
            scored = score_checkpoint(chosen.out / "final.pt", role, split, self.settings,
                                      chosen.seconds, self.also_splits())
            scored = replace(scored, budget_tokens=scored.train_tokens * len(runs),
                             lr_tried=tuple(r.lr for r in runs),
                             lr_valid_loss=tuple(r.valid_loss for r in runs))
            if self.settings.train_dir is None:
                scored = replace(scored, source=f"{chosen.out.name} (temporary, removed)")
            self._scored[key] = scored
            self._keep_run(scored)
        return self._scored[key]

    def plan(self, specs: list[str]) -> int:
        """How many training runs comparing every model of `specs` takes, baselines shared;
        the progress lines count against it. 0 in checkpoint mode."""
        if self.settings.checkpoints:
            return 0
        vocab = nominal_vocab(self.settings.tokenizer)
        runs = set()
        for spec in specs:
            for seed in self.settings.seeds:
                for lr in self.settings.rates:
                    runs.add((baseline_spec(spec, vocab), seed, "baseline", lr))
                    runs.add((spec, seed, "model", lr))
        self._planned = sorted(runs, key=lambda r: (r[2] != "baseline", r[0], r[1], r[3]))
        if self.progress is not None:
            self.progress.planned = len(runs)
        return len(runs)

    def _train_at(self, spec: str, seed: int, role: str, lr: float) -> SweepRun:
        key = (spec, seed, role, lr)
        if key not in self._swept and self.settings.jobs > 1 and key in self._planned:
            self._train_planned_in_parallel()
        if key not in self._swept:
            from muse.training.train import train

            out, what = self._run_names(*key)
            if self.progress is not None:
                self.progress.started(what, self.settings)
            t0 = time.perf_counter()
            result = train(self.settings.train_config(spec, seed, out, lr))
            self._finished(key, result.history, result.step, time.perf_counter() - t0)
        return self._swept[key]

    def _run_names(self, spec: str, seed: int, role: str, lr: float) -> tuple[Path, str]:
        sweep = bool(self.settings.lr_sweep)
        name = f"{spec.replace(':', '-')}-seed{seed}-{role}" + (f"-lr{lr:g}" if sweep else "")
        what = f"{spec} seed {seed} ({role}" + (f", lr {lr:g})" if sweep else ")")
        return self._train_root() / name, what

    def _finished(self, key: tuple[str, int, str, float], history: list, step: int,
                  seconds: float) -> None:
        spec, seed, role, lr = key
        out, what = self._run_names(*key)
        valid_loss = final_valid_loss(history)
        if valid_loss is None:
            raise RuntimeError(f"the run of {spec} (seed {seed}, lr {lr:g}) has no validation "
                               "loss at its last step; the learning-rate choice needs one")
        if self.progress is not None:
            self.progress.finished(what, step * self.settings.tokens_per_step, seconds,
                                   valid_loss)
        sweep = bool(self.settings.lr_sweep)
        self._keep_history(_label(spec, seed, role) + (f" lr{lr:g}" if sweep else ""), history)
        self._swept[key] = SweepRun(lr, out, valid_loss, seconds)

    def _train_planned_in_parallel(self) -> None:
        """Every planned run not yet trained, `train_jobs` at a time, each in a process of its
        own on a device of its own where there are several (run i on GPU i mod count)."""
        todo = [k for k in self._planned if k not in self._swept]
        devices = job_devices(self.settings.device)
        jobs = min(self.settings.jobs, len(todo))
        threads = max(1, (os.cpu_count() or 1) // jobs)
        if self.progress is not None:
            self.progress.parallel = jobs
            self.progress.say(f"perplexity gate: training {len(todo)} runs, {jobs} at a time, "
                              f"on {', '.join(sorted(set(devices)))}")
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {}
            for i, key in enumerate(todo):
                out, _ = self._run_names(*key)
                cfg = replace(self.settings.train_config(key[0], key[1], out, key[3]),
                              device=devices[i % len(devices)])
                futures[pool.submit(_train_in_child, cfg, threads)] = key
            for future in as_completed(futures):
                history, step, seconds = future.result()
                self._finished(futures[future], history, step, seconds)

    def loaded(self, path: str, role: str) -> Scored:
        if (path, role) not in self._loaded:
            self._loaded[path, role] = score_checkpoint(path, role, self.split(), self.settings,
                                                        also=self.also_splits())
        return self._loaded[path, role]

    def _keep_history(self, label: str, history: list) -> None:
        if self.history_dir is None:
            return
        self._histories[label] = history
        atomic_write_text(self.history_dir / "history.json",
                          json.dumps(self._histories, indent=1) + "\n")

    def _keep_run(self, scored: Scored) -> None:
        """runs.json: each scored run, with its recipe and (under a sweep) the rates it beat."""
        if self.history_dir is None:
            return
        label = _label(scored.spec, scored.seed, scored.role)
        self._runs.append({"label": label, **scored.facts(), "config": scored.config})
        atomic_write_text(self.history_dir / "runs.json", json.dumps(self._runs, indent=1) + "\n")

    def compare(self, spec: str) -> Comparison:
        vocab = self.split().vocab_size
        base = baseline_spec(spec, nominal_vocab(self.settings.tokenizer) or vocab)
        check_matched(spec, base, vocab)
        if self.settings.checkpoints:
            model_runs, base_runs = self._paired_checkpoints(spec, base)
        else:
            base_runs = [self.trained(base, s, "baseline") for s in self.settings.seeds]
            model_runs = [self.trained(spec, s, "model") for s in self.settings.seeds]
        key = (spec, model_runs[0].seed, "control")
        if key not in self._scored:
            self._scored[key] = score_untrained(model_runs[0], self.split(), self.settings)
        return Comparison(spec, base, self.settings.mode, tuple(model_runs), tuple(base_runs),
                          self._scored[key])

    def _paired_checkpoints(self, spec: str, base: str) -> tuple[list[Scored], list[Scored]]:
        """Both sides' checkpoints, paired by seed, once every one is known to be of its model
        and of one recipe (checked before any is scored)."""
        sides: dict[str, dict[int, str]] = {}
        for name in (spec, base):
            paths = [p for s, p in self.settings.checkpoints if s == name]
            configs = {p: self._head(p)["config"] for p in paths}
            wrong = [p for p, c in configs.items() if ":".join(models.resolve(c["model"])) != name]
            if wrong:
                raise MuseError(f"--checkpoint {name}=… names a checkpoint of another model: "
                                f"{', '.join(wrong)}")
            seeds = [configs[p]["seed"] for p in paths]
            if len(set(seeds)) != len(seeds):
                raise MuseError(f"the checkpoints of {name} share a seed ({seeds}); the gate "
                                "pairs model and baseline runs by seed")
            sides[name] = dict(zip(seeds, paths, strict=True))
        if set(sides[spec]) != set(sides[base]):
            raise MuseError(
                f"the checkpoints of {spec} have seeds {sorted(sides[spec])} and those of {base} "
                f"{sorted(sides[base])}; the gate pairs model and baseline runs by seed"
            )
        seeds = sorted(sides[spec])
        paths = [sides[spec][s] for s in seeds] + [sides[base][s] for s in seeds]
        first = self._head(paths[0])["recipe"]
        for path in paths[1:]:
            differ = recipe_differences(first, self._head(path)["recipe"])
            if differ:
                raise MuseError(
                    f"{paths[0]} and {path} were not trained with one recipe: they differ in "
                    f"{'; '.join(differ)}. The gate compares runs of one recipe, model and seed "
                    "apart: pass checkpoints trained alike"
                )
        return ([self.loaded(sides[spec][s], "model") for s in seeds],
                [self.loaded(sides[base][s], "baseline") for s in seeds])

    def _head(self, path: str) -> dict[str, Any]:
        """A checkpoint's config and recipe, without its weights."""
        if path not in self._heads:
            ckpt = load_checkpoint(path)
            self._heads[path] = {"config": ckpt["config"], "recipe": checkpoint_recipe(ckpt)}
        return self._heads[path]

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
