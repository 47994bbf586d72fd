"""The trainer: any registered model on a corpus, AdamW with linear warmup and cosine decay.

`train(cfg)` runs `cfg.steps` optimizer steps. Each step accumulates `grad_accum` micro-batches
of `batch_size` random contiguous windows of `seq_len` tokens from the tokenized train split;
the window starts come from one seeded `torch.Generator` whose state travels with every
checkpoint, so a resumed run draws exactly the batches the uninterrupted run would have drawn.

Files under `out_dir`: `step-NNNNNN.pt` every `checkpoint_every` steps, `best.pt` (lowest
validation loss), `final.pt` (where the run stopped), `emergency.pt` (on an exception, Ctrl-C
or SIGTERM), `run.json` (config, tokenizer and corpus hashes, and the run's status: running,
complete, diverged, interrupted or failed, with the reason) and `history.json` ({model spec:
[one row per step]}, the form `muse report --history` plots; a non-finite value is written as
null and named in the row's `nonfinite`).
Each is written to a temporary file in the same folder and moved into place with `os.replace`,
so a crash never leaves a torn file. A checkpoint holds the model, optimizer and scaler states,
the step, the data generator and RNG states, the config, the tokenizer name and hash, the best
validation loss and the history so far.

Everything a user can get wrong (device, corpus, tokenizer, model overrides, the checkpoint to
resume) is checked before `out_dir` is created. One training at a time holds `out_dir` (see
`muse.training.rundir`); a folder that already holds a run needs `resume` or `overwrite`. A
non-finite training or validation loss stops the run: nothing is saved as best, and the result's
`diverged` says why.

Under torchrun (or `muse train --nproc N`) the ranks train one model (`muse.training.distributed`):
`batch_size` is the global batch, each rank takes its slice; the loss and tokens/s in the
history are global, rank 0 writes every file, and history rows and run.json say how many ranks
ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from muse import models
from muse.devices import DEVICES, float32_matmuls, is_device_name, resolve_device
from muse.errors import MuseError
from muse.fileio import atomic_write_bytes
from muse.measure.perplexity import evaluate_perplexity, scored_bytes
from muse.measure.phases import DTYPES, autocast, dynamo_graphs, lm_loss, synchronize, torch_dtype
from muse.models.config import StrictConfig, check_keys
from muse.training import distributed
from muse.training.checkpoint import load_checkpoint, load_weights
from muse.training.data import (
    check_vocab,
    encoded_split,
    get_tokenizer,
    load_corpus,
    parse_tokenizer_name,
)
from muse.training.rundir import RunDir, check_reuse

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib


class ConfigError(MuseError):
    """A training config that names an unknown key or holds a value of the wrong type."""


class Terminated(BaseException):
    """SIGTERM during training, raised in the main thread as KeyboardInterrupt is for SIGINT,
    so both end in the same emergency save."""


# torch.compile's own modes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig(StrictConfig):
    model: str = "transformer:small"  # registry spec, name[:preset]
    model_overrides: dict = field(default_factory=dict)  # vocab_size defaults to the tokenizer's
    corpus: str = "../shared/data/wiki-mini"  # a `muse.training.data.load_corpus` spec
    tokenizer: str = "bytes"  # bytes | gpt2 | bpe:<vocab>
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps
    lr: float = 3e-4  # peak, reached at the end of warmup
    min_lr: float = 3e-5  # floor of the cosine decay, reached at `steps`
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (dim ≥ 2), not on norms and biases
    betas: tuple = (0.9, 0.95)
    clip_norm: float = 1.0  # global gradient norm; ≤ 0 disables clipping
    dtype: str = "fp32"  # autocast dtype: fp32 | bf16 | fp16 (fp16 adds loss scaling)
    checkpointing: bool = False  # activation checkpointing (a model override)
    compile: bool = False  # torch.compile the model
    # torch.compile's mode; "reduce-overhead" replays the step's kernels as CUDA graphs (fixed
    # shapes), what lifts a small batch off the launch overhead
    compile_mode: str = "default"
    # float32 matmuls on CUDA may use TF32 (cuBLAS; the delta rule's Triton pass): faster chunk
    # products at ~1e-3 relative error, no perplexity cost at the gate's budget (reports/).
    # False: exact float32, PyTorch's own default
    tf32: bool = True
    loss_chunk: int = 0  # > 0: the loss's logits made this many positions at a time (layers.head)
    seed: int = 0
    eval_every: int = 100  # validation every K steps (and at the end); 0: only at the end
    eval_tokens: int = 65536  # cap on validation tokens
    checkpoint_every: int = 0  # step-NNNNNN.pt every K steps; 0: none
    log_every: int = 1  # history.json rewritten every K steps (and at the end)
    out_dir: str = "runs/train"
    device: str = "auto"  # auto | cuda | cpu
    parallel: str = "ddp"  # ddp | fsdp (FSDP2): how several ranks share the model
    wandb: bool = False  # log to Weights & Biases (only when installed)
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for key in ("model", "corpus", "tokenizer", "out_dir", "dtype", "device", "parallel",
                    "compile_mode"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a string, got {getattr(self, key)!r}")
        if not isinstance(self.model_overrides, dict):
            raise ConfigError(f"model_overrides must be a table, got {self.model_overrides!r}")
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "eval_tokens", "log_every")
        for key in positive + ("warmup_steps", "eval_every", "checkpoint_every", "seed",
                               "loss_chunk"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{key} must be an integer, got {value!r}")
            if value < (1 if key in positive else 0):
                raise ConfigError(f"{key} must be {'≥ 1' if key in positive else '≥ 0'}, "
                                  f"got {value}")
        for key in ("lr", "min_lr", "weight_decay", "clip_norm"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{key} must be a number, got {value!r}")
            setattr(self, key, float(value))
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be ≥ 2 (one token to predict), got {self.seq_len}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 ≤ min_lr ≤ lr, got min_lr={self.min_lr}, lr={self.lr}")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        ):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in betas)
        for key in ("checkpointing", "compile", "tf32", "wandb", "progress"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got "
                              f"{self.compile_mode!r}")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"compile_mode={self.compile_mode!r} needs compile=true")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not is_device_name(self.device):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)} or cuda:<index>, got "
                              f"{self.device!r}")
        if self.parallel not in distributed.PARALLEL:
            raise ConfigError(f"parallel must be one of {', '.join(distributed.PARALLEL)}, "
                              f"got {self.parallel!r}")
        if self.eval_tokens < 2:
            raise ConfigError(f"eval_tokens must be ≥ 2 (a token to predict from the one before), "
                              f"got {self.eval_tokens}")
        try:
            models.resolve(self.model)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        parse_tokenizer_name(self.tokenizer)


# ------------------------------------------------------------------------------------ config


def _coerce(key: str, value: Any) -> Any:
    # tomllib gives ints for `1`, so a float field takes an int; every other check is __post_init__
    return float(value) if key in _FLOAT_KEYS and isinstance(value, int) else value


_FLOAT_KEYS = {f.name for f in dataclasses.fields(TrainConfig) if f.type == "float"}


def make_config(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a mapping; unknown keys and ill-typed values raise ConfigError."""
    try:
        check_keys(TrainConfig, values)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def parse_value(key: str, text: str) -> Any:
    """A `--set` value, read as a TOML value (`3e-4`, `true`, `[0.9, 0.95]`, `{n_layers = 2}`);
    for string fields a bare word is taken as it is (`--set model=transformer:tiny`)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}.get(key)
        if isinstance(default, str):
            return text
        raise ConfigError(f"--set {key}={text}: not a valid value for {key}") from None


def apply_sets(values: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides; `model_overrides.KEY=value` sets one model config key."""
    values = {**values, "model_overrides": dict(values.get("model_overrides", {}))}
    valid = TrainConfig.field_names()
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        top, dot, sub = key.partition(".")
        if top not in valid or (dot and top != "model_overrides"):
            raise ConfigError(f"--set: unknown config key {key!r}; valid keys: {', '.join(valid)}")
        if dot:
            values["model_overrides"][sub] = parse_value(sub, text)
        else:
            values[key] = parse_value(key, text)
    return values


def load_config(path: str | os.PathLike | None, sets: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a TOML file (top-level keys, `[model_overrides]` as a table) and
    `--set key=value` overrides applied on top."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{os.fspath(path)}: not a TOML config: {e}") from None
        except OSError as e:
            raise ConfigError(f"config {os.fspath(path)!r} cannot be read: "
                              f"{e.strerror or e}") from None
        try:
            check_keys(TrainConfig, values)
        except TypeError as e:
            raise ConfigError(f"{os.fspath(path)}: {e}") from None
    return make_config(apply_sets(values, list(sets)))


# ---------------------------------------------------------------------------------- schedule


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr` over
    `warmup_steps` steps (step w−1 gets the full lr), then cosine decay to `min_lr` at `steps`
    (Loshchilov & Hutter 2017, SGDR, without restarts)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------- utilities


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: Path) -> None:
    data = json.dumps(obj, indent=1, allow_nan=False).encode("utf-8")
    atomic_write_bytes(path, lambda f: f.write(data))


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def sample_batch(ids: torch.Tensor, batch: int, seq: int, gen: torch.Generator,
                 ranks: distributed.Ranks | None = None) -> torch.Tensor:
    """`batch` random contiguous windows of `seq` tokens (starts drawn from `gen`); with
    `ranks`, this rank's slice of them (every rank draws all `batch` starts)."""
    starts = torch.randint(0, ids.numel() - seq + 1, (batch,), generator=gen)
    if ranks is not None:
        starts = distributed.share(starts, ranks)
    return torch.stack([ids[s : s + seq] for s in starts.tolist()])


def weighted_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The model's own auxiliary loss from its last forward (MoE load balancing) times its
    config's `moe_aux_weight`; 0 for a model without one. It trains, it is not logged."""
    weight = getattr(getattr(model, "config", None), "moe_aux_weight", 0.0)
    if weight > 0 and callable(getattr(model, "aux_loss", None)):
        return weight * model.aux_loss()
    return 0.0


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                   fused: bool = True):
    # decay matrices (embeddings, linear weights), not gains and biases (nanoGPT's split)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if fused and device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=cfg.betas, **extra)


# ----------------------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    history: list[dict[str, Any]]
    best_val_loss: float | None
    diverged: str | None = None  # why the run stopped before `steps`: a non-finite loss
    rank: int = 0  # this process's rank; rank 0 wrote the files
    ranks: int = 1


def _model_overrides(cfg: TrainConfig, vocab_size: int) -> dict[str, Any]:
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("vocab_size", vocab_size)
    if cfg.checkpointing:
        overrides["checkpointing"] = True
    return overrides


_KINDS = ((bool, (bool,), "true or false"), (int, (int,), "an integer"),
          (float, (int, float), "a number"), (str, (str,), "a string"),
          (tuple, (list, tuple), "a list"))


def check_override_types(name: str, overrides: dict[str, Any]) -> None:
    """A model override whose type differs from its field's default names the key: the model
    configs check their sizes, not the type of every field."""
    defaults = {f.name: f.default for f in dataclasses.fields(models.family(name).config_cls)}
    for key, value in overrides.items():
        default = defaults.get(key)
        for kind, accepted, words in _KINDS:
            if isinstance(default, kind):
                if not isinstance(value, accepted) or (kind is not bool
                                                       and isinstance(value, bool)):
                    raise ConfigError(f"model_overrides.{key} must be {words}, got {value!r}")
                break


def model_setup(cfg: TrainConfig, tokenizer) -> tuple[str, str, dict[str, Any]]:
    """(name, preset, overrides) of the model to train; ConfigError for a bad override."""
    name, preset = models.resolve(cfg.model)
    overrides = _model_overrides(cfg, tokenizer.vocab_size)
    check_override_types(name, overrides)
    try:
        config = models.config(name, preset, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model_overrides for {cfg.model}: {e}") from None
    check_vocab(config.vocab_size, tokenizer)
    return name, preset, overrides


def token_splits(cfg: TrainConfig, corpus, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The train ids and the first `eval_tokens` valid ids; MuseError when either is too short."""
    train_ids = encoded_split(tokenizer, corpus, "train")
    valid_ids = encoded_split(tokenizer, corpus, "valid")
    if train_ids.numel() < cfg.seq_len:
        raise MuseError(f"the train split of corpus {corpus.name!r} has {train_ids.numel()} "
                        f"{tokenizer.name} tokens, fewer than seq_len={cfg.seq_len}; lower "
                        "seq_len or use a longer corpus")
    if valid_ids.numel() < 2:
        raise MuseError(f"the valid split of corpus {corpus.name!r} has {valid_ids.numel()} "
                        f"{tokenizer.name} token(s); validation needs at least 2")
    return train_ids, valid_ids[: cfg.eval_tokens]


RECIPE_KEYS = ("model", "model_overrides", "tokenizer", "seq_len", "batch_size", "grad_accum")


def checked_resume(path: str | os.PathLike, cfg: TrainConfig, tokenizer) -> dict[str, Any]:
    """The checkpoint to resume from, once it is known to match this config and tokenizer."""
    ckpt = load_checkpoint(path)
    saved, current = ckpt["config"], cfg.to_dict()
    changed = [f"{k} ({saved.get(k)!r} there, {current[k]!r} here)"
               for k in RECIPE_KEYS if saved.get(k) != current[k]]
    if changed:
        raise MuseError(f"cannot resume {os.fspath(path)!r}: the config differs from the "
                        f"checkpoint's in {'; '.join(changed)}")
    if ckpt["tokenizer"].get("sha256") != tokenizer.sha256:
        raise MuseError(f"cannot resume {os.fspath(path)!r}: it was trained with another "
                        f"{ckpt['tokenizer'].get('name')!r} tokenizer (its hash differs)")
    return ckpt


class Signals:
    """SIGINT and SIGTERM during training. Each raises (KeyboardInterrupt, Terminated), except
    inside `atomic()` — an optimizer step and its bookkeeping, which a checkpoint must see
    whole — where it is raised as the block ends, and while `saving()`, where it waits for the
    save and says so. Only the main thread can set handlers; elsewhere Python's stay."""

    def __init__(self) -> None:
        self.deferring, self.pending, self.saving_what = False, None, None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle)
                             for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.saving_what is not None:
            print(f"muse train: {signal.Signals(signum).name} while saving {self.saving_what}: "
                  "exiting when the save is done", file=sys.stderr, flush=True)
            return
        error = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if self.deferring:
            self.pending = self.pending or error
            return
        raise error()

    @contextlib.contextmanager
    def atomic(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            error, self.pending = self.pending, None
            raise error()

    @contextlib.contextmanager
    def saving(self, what: str):
        self.saving_what = what
        try:
            yield
        finally:
            self.saving_what = None


def _nonfinite_to_null(value: Any, path: str, found: dict[str, str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found[path] = str(value)
        return None
    if isinstance(value, dict):
        return {k: _nonfinite_to_null(v, f"{path}.{k}" if path else k, found)
                for k, v in value.items()}
    return value


def history_document(spec: str, history: list[dict[str, Any]]) -> dict[str, Any]:
    """history.json: JSON has no NaN or ∞, so such a value is null and the row's `nonfinite`
    names it ({"loss": "nan"})."""
    rows = []
    for row in history:
        found: dict[str, str] = {}
        clean = _nonfinite_to_null(row, "", found)
        rows.append({**clean, "nonfinite": found} if found else clean)
    return {spec: rows}


@dataclass
class Checked:
    """What `check` found: everything the run needs that a user's mistake could spoil."""

    device: torch.device
    dtype: torch.dtype
    out: Path
    corpus: Any
    tokenizer: Any
    train_ids: torch.Tensor
    valid_ids: torch.Tensor
    name: str
    preset: str
    overrides: dict[str, Any]
    ckpt: dict[str, Any] | None


def check(cfg: TrainConfig, resume: str | os.PathLike | None = None, overwrite: bool = False,
          world: int | None = None) -> Checked:
    """Every check a user's mistake can fail, before `out_dir` is created; `world`: the number
    of ranks that will train (default: torchrun's, or 1). Only rank 0 looks at `out_dir`."""
    rank, launched, _ = distributed.launched_world()
    world = launched if world is None else world
    device = resolve_device(cfg.device)
    dtype = torch_dtype(cfg.dtype)
    distributed.check_share(cfg.batch_size, world)
    distributed.check_parallel(cfg.parallel, cfg.dtype, world)
    out = Path(cfg.out_dir)
    if rank == 0:
        check_reuse(out, resume is not None, overwrite)
    corpus = load_corpus(cfg.corpus)
    tokenizer = get_tokenizer(cfg.tokenizer, corpus)
    train_ids, valid_ids = token_splits(cfg, corpus, tokenizer)
    name, preset, overrides = model_setup(cfg, tokenizer)
    ckpt = checked_resume(resume, cfg, tokenizer) if resume is not None else None
    return Checked(device, dtype, out, corpus, tokenizer, train_ids, valid_ids, name, preset,
                   overrides, ckpt)


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None,
          overwrite: bool = False) -> TrainResult:
    """Train per `cfg`; with `resume`, continue from a checkpoint exactly where it stopped.
    `overwrite`: replace a run already in `out_dir` (without it, or `resume`, that is refused).
    Under torchrun, every rank calls it; rank 0 holds `out_dir`.
    """
    checked = check(cfg, resume, overwrite)
    ranks, checked.device = distributed.join(checked.device, cfg.parallel)
    finished = False
    try:
        held = (RunDir(checked.out, resume=resume is not None, overwrite=overwrite)
                if ranks.main else contextlib.nullcontext())
        with held, Signals() as signals, float32_matmuls(cfg.tf32):
            result = Trainer(cfg, checked, ranks, signals, resume).fit()
        finished = True
        return result
    finally:
        distributed.leave(ranks, finished)


def _wandb_run(cfg: TrainConfig, out: Path):
    """A Weights & Biases run, or None (with a warning) when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        warnings.warn("wandb = true, but wandb is not installed: not logging to W&B",
                      stacklevel=3)
        return None
    return wandb.init(config=cfg.to_dict(), dir=str(out))


class Trainer:
    """One training run, in named pieces: set-up (the constructor), `resume`, `train_step`,
    `evaluate`/`validate`, `save` (a checkpoint) and `fit`, the loop that strings them together
    and saves what it can when the run is stopped."""

    def __init__(self, cfg: TrainConfig, c: Checked, ranks: distributed.Ranks, signals: Signals,
                 resume: str | os.PathLike | None = None) -> None:
        self.cfg, self.ranks, self.signals = cfg, ranks, signals
        self.device, self.dtype, self.out = c.device, c.dtype, c.out
        self.tokenizer, self.corpus, self.overrides = c.tokenizer, c.corpus, c.overrides
        self.train_ids, self.valid_ids = c.train_ids, c.valid_ids
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.raw_model = models.build(c.name, c.preset, **c.overrides).to(self.device).train()
        if c.ckpt is not None:
            load_weights(self.raw_model, c.ckpt, resume)  # before FSDP shards the parameters
        self.wrapped = distributed.wrap(self.raw_model, ranks, self.device)
        self.model = self._compiled(self.wrapped)
        # with DDP, validation needs no other rank: the module under the wrapper
        self.eval_model = (self.model if not ranks.several or ranks.fsdp
                           else self._compiled(self.raw_model))
        self.optimizer = make_optimizer(self.raw_model, cfg, self.device, fused=not ranks.fsdp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.step, self.best_val, self.history = 0, None, []
        self.start_state = None  # (data generator, RNG) at the start of a step in flight
        self.diverged: str | None = None
        if c.ckpt is not None:
            self.resume(c.ckpt)
        if ranks.rank > 0:  # dropout masks of its own; rank 0 keeps the stream a checkpoint saves
            torch.manual_seed(cfg.seed + 1_000_003 * ranks.rank + self.step)
        self.wandb_run = _wandb_run(cfg, self.out) if cfg.wandb and ranks.main else None

    def _compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.cfg.compile:
            return module
        return torch.compile(module, mode=self.cfg.compile_mode)

    def resume(self, ckpt: dict[str, Any]) -> None:
        """Optimizer, scaler, data generator, RNG, step, best and history from a checkpoint
        (its weights were loaded before wrapping)."""
        distributed.load_optimizer(self.raw_model, self.optimizer, ckpt["optimizer"], self.ranks)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.gen.set_state(ckpt["data_generator"])
        set_rng_states(ckpt["rng"])
        self.step, self.best_val, self.history = (ckpt["step"], ckpt["best_val_loss"],
                                                  ckpt["history"])

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; its history row."""
        cfg, device, ranks, raw_model = self.cfg, self.device, self.ranks, self.raw_model
        self.start_state = (self.gen.get_state(), rng_states())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        graphs_before = dynamo_graphs() if cfg.compile else 0
        t0 = time.perf_counter()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            if cfg.compile_mode == "reduce-overhead":  # the config holds it only with compile
                # a new step: the graphs may overwrite the last one's outputs, all consumed
                torch.compiler.cudagraph_mark_step_begin()
            x = sample_batch(self.train_ids, cfg.batch_size, cfg.seq_len, self.gen,
                             ranks).to(device)
            with distributed.grad_sync(self.wrapped, ranks, micro == cfg.grad_accum - 1):
                with autocast(device, self.dtype):
                    loss = (self.model(x, loss_chunk=cfg.loss_chunk) if cfg.loss_chunk
                            else lm_loss(self.model(x), x)) / cfg.grad_accum
                self.scaler.scale(loss + weighted_aux_loss(raw_model) / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        loss_sum = distributed.mean(loss_sum, ranks)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
        grad_norm = distributed.replicated(
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm))
        # the update and its step count, RNG and history row change together: a signal
        # here is raised after them, so a checkpoint never sees half of them
        with self.signals.atomic():
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.start_state = None
            synchronize(device)
            seconds = time.perf_counter() - t0
            entry: dict[str, Any] = {
                "step": self.step,
                "loss": loss_sum.item(),
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm.item(),
                "tokens_per_s": cfg.batch_size * cfg.seq_len * cfg.grad_accum / seconds,  # global
                "peak_mem_bytes": (torch.cuda.max_memory_allocated(device)
                                   if device.type == "cuda" else None),  # rank 0's device
                "ranks": ranks.world,
            }
            if cfg.compile and dynamo_graphs() > graphs_before:
                # the first step's count is the model's (1: no graph break); later, recompiles
                entry["graphs_compiled"] = dynamo_graphs() - graphs_before
            if callable(getattr(raw_model, "diagnostics", None)):
                with torch.no_grad():
                    diagnostics = raw_model.diagnostics()
                entry["diagnostics"] = {k: float(v) for k, v in diagnostics.items()}
            self.history.append(entry)  # before any save: a checkpoint holds its own step's row
        return entry

    def evaluate(self) -> dict[str, float]:
        """Validation loss, perplexity and bits per byte on the capped valid split."""
        cfg = self.cfg
        with autocast(self.device, self.dtype):
            res = evaluate_perplexity(self.eval_model, self.valid_ids,
                                      scored_bytes(self.tokenizer, self.valid_ids),
                                      context=cfg.seq_len, stride=cfg.seq_len,
                                      batch_size=cfg.batch_size, device=self.device)
        return distributed.from_main({"val_loss": res.nll_per_token, "val_ppl": res.ppl,
                                      "val_bits_per_byte": res.bits_per_byte}, self.ranks)

    def validate(self, entry: dict[str, Any]) -> None:
        """`evaluate` into the step's row; a non-finite score marks the run diverged, a better
        one is saved as best.pt."""
        entry.update(self.evaluate())
        if self.diverged is None and not math.isfinite(entry["val_loss"]):
            self.diverged = f"validation loss {entry['val_loss']} at step {self.step}"
        if self.diverged is None and (self.best_val is None or entry["val_loss"] < self.best_val):
            with self.signals.atomic():  # best_val and best.pt agree in any checkpoint
                self.best_val = entry["val_loss"]
                self.save("best.pt")

    def state(self, data_state: torch.Tensor, rngs: dict[str, Any]) -> dict[str, Any]:
        """Everything a resume needs; every rank calls it (FSDP gathers the shards)."""
        weights, moments = distributed.full_state(self.raw_model, self.optimizer, self.ranks)
        return {
            "model": weights,
            "optimizer": moments,
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "data_generator": data_state,
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "model_overrides": self.overrides,
            "tokenizer": {"name": self.tokenizer.name, "sha256": self.tokenizer.sha256},
            "corpus": {"name": self.corpus.name, "sha256": self.corpus.sha256},
            "best_val_loss": self.best_val,
            "history": self.history,
            "distributed": self.ranks.describe(),
        }

    def save(self, filename: str, data_state=None, rngs=None) -> None:
        data_state = self.gen.get_state() if data_state is None else data_state
        saved = self.state(data_state, rngs or rng_states())
        if self.ranks.main:
            atomic_save(saved, self.out / filename)

    def write_history(self) -> None:
        if self.ranks.main:
            atomic_write_json(history_document(self.cfg.model, self.history),
                              self.out / "history.json")

    def write_run(self, status: str, **why: Any) -> None:
        if self.ranks.main:
            doc = run_document(self.cfg, self.tokenizer, self.corpus, self.overrides, self.ranks)
            atomic_write_json({**doc, "status": status, "step": self.step, **why},
                              self.out / "run.json")

    def fit(self) -> TrainResult:
        """Steps until `cfg.steps` or divergence, validating, logging and checkpointing on the
        config's schedule; on an exception, saves what it can and re-raises."""
        cfg, ranks = self.cfg, self.ranks
        from muse.extras import needs

        with needs("the progress bar"):
            from tqdm.auto import tqdm

        self.write_run("running")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and ranks.main),
                   desc="train")
        try:
            while self.step < cfg.steps:
                entry = self.train_step()
                step = self.step
                if not math.isfinite(entry["loss"]):
                    self.diverged = f"training loss {entry['loss']} at step {step}"
                # a diverged run is validated once more: its last row carries what it scores now
                evaluated = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
                if evaluated or self.diverged:
                    self.validate(entry)
                if self.wandb_run is not None:
                    self.wandb_run.log(entry, step=step)
                if step % cfg.log_every == 0 or step == cfg.steps or evaluated or self.diverged:
                    self.write_history()
                if self.diverged:
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save(f"step-{step:06d}.pt")
                bar.update(1)
                bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{entry['lr']:.2e}")
            self.save("final.pt")
            if self.diverged:
                self.write_run("diverged", reason=self.diverged)
            else:
                self.write_run("complete")
        except BaseException as exc:
            self.on_exception(exc)
            raise
        finally:
            bar.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()
        return TrainResult(self.out, self.step, self.history, self.best_val, self.diverged,
                           ranks.rank, ranks.world)

    def on_exception(self, exc: BaseException) -> None:
        """Rank 0 saves emergency.pt (not under FSDP, whose shards cannot be gathered once a
        rank has stopped) and records the status; another rank marks the exception as its."""
        if not self.ranks.main:
            exc.rank = self.ranks.rank  # rank 0 saves, and says so
        elif self.ranks.fsdp:
            exc.emergency_error = ("under FSDP the state is spread over the ranks and cannot be "
                                   "gathered once one has stopped; resume from the last "
                                   "step-NNNNNN.pt")
            self.final_words(exc)
        else:
            self.emergency(exc)

    def emergency(self, exc: BaseException) -> None:
        """emergency.pt, once. A step in flight has not changed the weights (the optimizer steps
        last): the state from before it is saved, so a resume redraws that step's batches. The
        exception carries `emergency_checkpoint` only when the file was written."""
        with self.signals.saving("emergency.pt"):
            try:
                if self.start_state is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.save("emergency.pt", *self.start_state)
                else:
                    self.save("emergency.pt")
                exc.emergency_checkpoint = self.out / "emergency.pt"
                self.write_history()
                self.write_run(_status(exc), reason=type(exc).__name__, emergency="emergency.pt")
            except Exception as e:  # the original exception says what happened; this adds why
                exc.emergency_error = f"{type(e).__name__}: {e}"

    def final_words(self, exc: BaseException) -> None:
        """history.json and run.json of a run that stops without emergency.pt."""
        with self.signals.saving("history.json"):
            try:
                self.write_history()
                self.write_run(_status(exc), reason=type(exc).__name__)
            except Exception:  # the original exception is what the user must see
                pass


def _status(exc: BaseException) -> str:
    return {KeyboardInterrupt: "interrupted", Terminated: "interrupted"}.get(type(exc), "failed")


def run_document(cfg: TrainConfig, tokenizer, corpus, overrides,
                 ranks: distributed.Ranks | None = None) -> dict[str, Any]:
    return {
        "config": cfg.to_dict(),
        "model_overrides": overrides,
        "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256},
        "corpus": {"name": corpus.name, "sha256": corpus.sha256},
        "distributed": (ranks or distributed.Ranks()).describe(),
    }
