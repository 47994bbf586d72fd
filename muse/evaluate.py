"""`muse eval`: sliding-window perplexity and bits per byte of a trained checkpoint.

The tokenizer is rebuilt from the training corpus and must hash to the one the checkpoint was
trained with; a different corpus may be scored (`corpus=`), a different tokenizer may not.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from muse import models
from muse.data import get_tokenizer, load_corpus
from muse.measure.perplexity import evaluate_perplexity, scored_bytes
from muse.train import resolve_device


def load_model(checkpoint: str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, dict]:
    # The checkpoints hold RNG states (Python objects): load only checkpoints you trust.
    ckpt = torch.load(checkpoint, map_location=device, weights_only=False)
    name, preset = models.resolve(ckpt["config"]["model"])
    with torch.device(device):
        model = models.build(name, preset, **ckpt["model_overrides"])
    model.load_state_dict(ckpt["model"])
    return model, ckpt


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
    tokenizer = get_tokenizer(ckpt["tokenizer"]["name"], corpus=load_corpus(cfg["corpus"]))
    if tokenizer.sha256 != ckpt["tokenizer"]["sha256"]:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} rebuilt from {cfg['corpus']!r} hashes to "
            f"{tokenizer.sha256[:12]}, but the checkpoint was trained with "
            f"{ckpt['tokenizer']['sha256'][:12]}: the training corpus has changed"
        )
    scored = load_corpus(corpus or cfg["corpus"])
    if split not in scored.splits:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(scored.splits)}")
    ids = torch.tensor(tokenizer.encode(scored.splits[split]), dtype=torch.long)
    context = context or cfg["seq_len"]
    stride = stride or max(1, context // 2)
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
