"""The trainer: any registered model on a corpus, AdamW with linear warmup and cosine decay.

`train(cfg)` runs `cfg.steps` optimizer steps. Each step accumulates `grad_accum` micro-batches
of `batch_size` random contiguous windows of `seq_len` tokens from the tokenized train split;
the window starts come from one seeded `torch.Generator` whose state travels with every
checkpoint, so a resumed run draws exactly the batches the uninterrupted run would have drawn.

Files under `out_dir`: `step-NNNNNN.pt` every `checkpoint_every` steps, `best.pt` (lowest
validation loss), `final.pt`, `emergency.pt` (on an exception or Ctrl-C), `run.json` (config,
tokenizer and corpus hashes) and `history.json` ({model spec: [one row per step]}, the form
`muse report --history` plots).
Each is written to a temporary file in the same folder and moved into place with `os.replace`,
so a crash never leaves a torn file. A checkpoint holds the model, optimizer and scaler states,
the step, the data generator and RNG states, the config, the tokenizer name and hash, the best
validation loss and the history so far.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from muse import models
from muse.data import check_vocab, encoded_split, get_tokenizer, load_corpus
from muse.fileio import atomic_write_bytes
from muse.measure.perplexity import evaluate_perplexity, scored_bytes
from muse.measure.phases import DTYPES, autocast, lm_loss, synchronize, torch_dtype
from muse.models.config import StrictConfig, check_keys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

DEVICES = ("auto", "cuda", "cpu")


class ConfigError(ValueError):
    """A training config that names an unknown key or holds a value of the wrong type."""


@dataclass
class TrainConfig(StrictConfig):
    model: str = "transformer:small"  # registry spec, name[:preset]
    model_overrides: dict = field(default_factory=dict)  # vocab_size defaults to the tokenizer's
    corpus: str = "../shared/data/wiki-mini"  # a `muse.data.load_corpus` spec
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
    seed: int = 0
    eval_every: int = 100  # validation every K steps (and at the end); 0: only at the end
    eval_tokens: int = 65536  # cap on validation tokens
    checkpoint_every: int = 0  # step-NNNNNN.pt every K steps; 0: none
    log_every: int = 1  # history.json rewritten every K steps (and at the end)
    out_dir: str = "runs/train"
    device: str = "auto"  # auto | cuda | cpu
    wandb: bool = False  # log to Weights & Biases (only when installed)
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for key in ("model", "corpus", "tokenizer", "out_dir", "dtype", "device"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a string, got {getattr(self, key)!r}")
        if not isinstance(self.model_overrides, dict):
            raise ConfigError(f"model_overrides must be a table, got {self.model_overrides!r}")
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "eval_tokens", "log_every")
        for key in positive + ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
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
        for key in ("checkpointing", "compile", "wandb", "progress"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        models.resolve(self.model)


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
        with open(path, "rb") as f:
            try:
                values = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{os.fspath(path)}: {e}") from None
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
    data = json.dumps(obj, indent=1).encode("utf-8")
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but CUDA is not available")
    return torch.device(name)


def sample_batch(ids: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random contiguous windows of `seq` tokens (starts drawn from `gen`)."""
    starts = torch.randint(0, ids.numel() - seq + 1, (batch,), generator=gen)
    return torch.stack([ids[s : s + seq] for s in starts.tolist()])


def weighted_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The model's own auxiliary loss from its last forward (MoE load balancing) times its
    config's `moe_aux_weight`; 0 for a model without one. It trains, it is not logged."""
    weight = getattr(getattr(model, "config", None), "moe_aux_weight", 0.0)
    if weight > 0 and callable(getattr(model, "aux_loss", None)):
        return weight * model.aux_loss()
    return 0.0


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    # decay matrices (embeddings, linear weights), not gains and biases (nanoGPT's split)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=cfg.betas, **extra)


# ----------------------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    history: list[dict[str, Any]]
    best_val_loss: float | None


def _model_overrides(cfg: TrainConfig, vocab_size: int) -> dict[str, Any]:
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("vocab_size", vocab_size)
    if cfg.checkpointing:
        overrides["checkpointing"] = True
    return overrides


RECIPE_KEYS = ("model", "model_overrides", "tokenizer", "seq_len", "batch_size", "grad_accum")


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> TrainResult:
    """Train per `cfg`; with `resume`, continue from a checkpoint exactly where it stopped."""
    device = resolve_device(cfg.device)
    dtype = torch_dtype(cfg.dtype)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus(cfg.corpus)
    tokenizer = get_tokenizer(cfg.tokenizer, corpus)
    train_ids = encoded_split(tokenizer, corpus, "train")
    valid_ids = encoded_split(tokenizer, corpus, "valid")
    valid_ids = valid_ids[: cfg.eval_tokens]
    if train_ids.numel() < cfg.seq_len:
        raise ValueError(f"the train split has {train_ids.numel()} tokens, fewer than "
                         f"seq_len={cfg.seq_len}")
    if valid_ids.numel() < 2:
        raise ValueError(f"the valid split of {corpus.name!r} has {valid_ids.numel()} tokens; "
                         "validation needs at least 2")

    ckpt = None
    if resume is not None:
        ckpt = torch.load(resume, map_location="cpu", weights_only=False)
        saved, current = ckpt["config"], cfg.to_dict()
        changed = [k for k in RECIPE_KEYS if saved[k] != current[k]]
        if changed:
            raise ValueError(f"cannot resume {os.fspath(resume)}: config differs in "
                             f"{', '.join(changed)} from the checkpoint's")
        if ckpt["tokenizer"]["sha256"] != tokenizer.sha256:
            raise ValueError(f"cannot resume {os.fspath(resume)}: tokenizer hash differs")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    name, preset = models.resolve(cfg.model)
    overrides = _model_overrides(cfg, tokenizer.vocab_size)
    check_vocab(models.config(name, preset, **overrides).vocab_size, tokenizer)
    raw_model = models.build(name, preset, **overrides).to(device).train()
    model = torch.compile(raw_model) if cfg.compile else raw_model
    optimizer = make_optimizer(raw_model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    step, best_val, history = 0, None, []
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        gen.set_state(ckpt["data_generator"])
        set_rng_states(ckpt["rng"])
        step, best_val, history = ckpt["step"], ckpt["best_val_loss"], ckpt["history"]

    run = None
    if cfg.wandb:
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb = true, but wandb is not installed: not logging to W&B",
                          stacklevel=2)
        else:
            run = wandb.init(config=cfg.to_dict(), dir=str(out))

    def state(data_state: torch.Tensor, rngs: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "data_generator": data_state,
            "rng": rngs,
            "config": cfg.to_dict(),
            "model_overrides": overrides,
            "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256},
            "corpus": {"name": corpus.name, "sha256": corpus.sha256},
            "best_val_loss": best_val,
            "history": history,
        }

    def save(filename: str, data_state=None, rngs=None) -> None:
        data_state = gen.get_state() if data_state is None else data_state
        atomic_save(state(data_state, rngs or rng_states()), out / filename)

    def evaluate() -> dict[str, float]:
        with autocast(device, dtype):
            res = evaluate_perplexity(model, valid_ids, scored_bytes(tokenizer, valid_ids),
                                      context=cfg.seq_len, stride=cfg.seq_len,
                                      batch_size=cfg.batch_size, device=device)
        return {"val_loss": res.nll_per_token, "val_ppl": res.ppl,
                "val_bits_per_byte": res.bits_per_byte}

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    from tqdm.auto import tqdm

    atomic_write_json(run_document(cfg, tokenizer, corpus, overrides), out / "run.json")
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc="train")
    start_state = None  # (data generator, RNG) at the start of a step in flight
    try:
        while step < cfg.steps:
            start_state = (gen.get_state(), rng_states())
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for _ in range(cfg.grad_accum):
                x = sample_batch(train_ids, cfg.batch_size, cfg.seq_len, gen).to(device)
                with autocast(device, dtype):
                    loss = lm_loss(model(x), x) / cfg.grad_accum
                scaler.scale(loss + weighted_aux_loss(raw_model) / cfg.grad_accum).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            max_norm = cfg.clip_norm if cfg.clip_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            start_state = None
            synchronize(device)
            seconds = time.perf_counter() - t0

            entry: dict[str, Any] = {
                "step": step,
                "loss": loss_sum.item(),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm.item(),
                "tokens_per_s": tokens_per_step / seconds,
                "peak_mem_bytes": (torch.cuda.max_memory_allocated(device)
                                   if device.type == "cuda" else None),
            }
            if callable(getattr(raw_model, "diagnostics", None)):
                with torch.no_grad():
                    diagnostics = raw_model.diagnostics()
                entry["diagnostics"] = {k: float(v) for k, v in diagnostics.items()}
            history.append(entry)  # before any save, so a checkpoint holds its own step's row
            evaluated = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
            if evaluated:
                entry.update(evaluate())
                if best_val is None or entry["val_loss"] < best_val:
                    best_val = entry["val_loss"]
                    save("best.pt")
            if run is not None:
                run.log(entry, step=step)
            if step % cfg.log_every == 0 or step == cfg.steps or evaluated:
                atomic_write_json({cfg.model: history}, out / "history.json")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(f"step-{step:06d}.pt")
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{lr:.2e}")
        save("final.pt")
    except BaseException:
        # A step in flight has not changed the weights (the optimizer steps last): save the
        # state from before it, so a resume redraws that step's batches.
        if start_state is not None:
            optimizer.zero_grad(set_to_none=True)
            save("emergency.pt", *start_state)
        else:
            save("emergency.pt")
        atomic_write_json({cfg.model: history}, out / "history.json")
        raise
    finally:
        bar.close()
        if run is not None:
            run.finish()
    return TrainResult(out, step, history, best_val)


def run_document(cfg: TrainConfig, tokenizer, corpus, overrides) -> dict[str, Any]:
    return {
        "config": cfg.to_dict(),
        "model_overrides": overrides,
        "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256},
        "corpus": {"name": corpus.name, "sha256": corpus.sha256},
    }
