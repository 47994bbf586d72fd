"""`muse eval`: sliding-window perplexity and bits per byte of a trained checkpoint.

The tokenizer is rebuilt from the training corpus and must hash to the one the checkpoint was
trained with; a different corpus may be scored (`corpus=`), a different tokenizer may not.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from muse import models
from muse.devices import resolve_device
from muse.errors import MuseError
from muse.measure.perplexity import evaluate_perplexity, scored_bytes
from muse.training.checkpoint import load_checkpoint, load_weights
from muse.training.data import get_tokenizer, load_corpus


def load_model(checkpoint: str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, dict]:
    ckpt = load_checkpoint(checkpoint, map_location=device)
    try:
        name, preset = models.resolve(ckpt["config"]["model"])
        with torch.device(device):
            model = models.build(name, preset, **ckpt["model_overrides"])
    except (ValueError, TypeError) as e:  # a model this muse does not have, or not so
        raise MuseError(f"checkpoint {os.fspath(checkpoint)!r}: cannot build its model "
                        f"({e})") from None
    load_weights(model, ckpt, checkpoint)
    return model, ckpt


def checkpoint_tokenizer(ckpt: dict):
    """The tokenizer the checkpoint was trained with, rebuilt from its training corpus; an error
    when the rebuilt one hashes differently (the corpus has changed since)."""
    cfg = ckpt["config"]
    tokenizer = get_tokenizer(ckpt["tokenizer"]["name"], corpus=load_corpus(cfg["corpus"]))
    if tokenizer.sha256 != ckpt["tokenizer"]["sha256"]:
        raise MuseError(
            f"tokenizer {tokenizer.name!r} rebuilt from {cfg['corpus']!r} hashes to "
            f"{tokenizer.sha256[:12]}, but the checkpoint was trained with "
            f"{ckpt['tokenizer']['sha256'][:12]}: the training corpus has changed"
        )
    return tokenizer


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    split: str = "test",
    context: int | None = None,
    stride: int | None = None,
    corpus: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
) -> dict:
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    cfg = ckpt["config"]
    tokenizer = checkpoint_tokenizer(ckpt)
    scored = load_corpus(corpus or cfg["corpus"])
    if split not in scored.splits:
        raise MuseError(f"unknown split {split!r}; valid: {', '.join(scored.splits)}")
    ids = torch.tensor(tokenizer.encode(scored.splits[split]), dtype=torch.long)
    context = context or cfg["seq_len"]
    stride = stride or max(1, context // 2)
    if context < 2:
        raise MuseError(f"--context must be ≥ 2 (a token to predict), got {context}")
    if not 1 <= stride <= context:
        raise MuseError(f"--stride must be in [1, --context={context}], got {stride}")
    if ids.numel() < 2:
        raise MuseError(f"the {split} split of {scored.name!r} has {ids.numel()} token(s); "
                        "perplexity needs at least 2")
    result = evaluate_perplexity(
        model, ids, scored_bytes(tokenizer, ids), context, stride, batch_size, dev
    )
    return {
        **dataclasses.asdict(result),
        "split": split,
        "checkpoint": str(checkpoint),
        "step": ckpt["step"],
        "model": cfg["model"],
        "tokenizer": ckpt["tokenizer"],
        "corpus": {"name": scored.name, "sha256": scored.sha256},
    }
