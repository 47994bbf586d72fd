"""The two workloads every criterion measures: a no-grad forward and a training step.

Both are closures over prepared inputs so that memory, timing and throughput measure exactly
the same work. Inputs are random token ids from a seeded generator (never zeros: constant
inputs can hide wrong indexing and run faster than real data).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.layers.head import wide

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None


def random_ids(vocab_size: int, batch: int, seq: int, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen).to(device)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device | str, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over every position (in fp32 at least)."""
    return F.cross_entropy(wide(logits[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def training_loss(model: nn.Module, ids: torch.Tensor, loss_chunk: int = 0) -> torch.Tensor:
    """`lm_loss` of the model on ids; with `loss_chunk` > 0 the model makes it itself, that many
    positions' logits at a time (layers.head), so the full logits never exist."""
    if loss_chunk:
        return model(ids, loss_chunk=loss_chunk)
    return lm_loss(model(ids), ids)


def forward_fn(
    model: nn.Module, ids: torch.Tensor, dtype: torch.dtype
) -> Callable[[], torch.Tensor]:
    """Inference forward with the weights themselves in `dtype` (how a model is served); the
    call returns the logits."""
    model.to(dtype=dtype).eval()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(ids)

    return run


class TrainStep:
    """One optimisation step: fp32 master weights, autocast to `dtype`, loss scaling for fp16,
    AdamW (torch's fused kernel when `fused` and on CUDA). Calling it runs forward, backward and
    the optimizer update; `last_loss` keeps the loss so callers can check it is finite."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, dtype: torch.dtype, lr: float = 1e-4,
                 fused: bool = False, loss_chunk: int = 0):
        self.model = model.to(dtype=torch.float32).train()
        self.ids = ids
        self.dtype = dtype
        self.device = ids.device
        self.fused = fused and self.device.type == "cuda"
        extra = {"fused": True} if self.fused else {}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, **extra)
        enabled = dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=enabled)
        self.loss_chunk = loss_chunk  # > 0: the chunked loss (layers.head), 0: the full logits
        self.last_loss: torch.Tensor | None = None

    def __call__(self) -> None:
        with autocast(self.device, self.dtype):
            loss = training_loss(self.model, self.ids, self.loss_chunk)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()


PHASES = ("forward", "train_step")
# the same two replayed from a CUDA graph (muse.measure.graphs): the device's work without the
# per-kernel launch cost, CUDA only
GRAPHED_PHASES = ("graphed_forward", "graphed_train_step")


def make_phase(
    phase: str, model: nn.Module, ids: torch.Tensor, dtype: torch.dtype
) -> Callable[[], object]:
    if phase == "forward":
        return forward_fn(model, ids, dtype)
    if phase == "train_step":
        return TrainStep(model, ids, dtype)
    if phase in GRAPHED_PHASES:
        # imported here: graphs imports this module
        from muse.measure.graphs import GraphedForward, GraphedTrainStep

        if phase == "graphed_forward":
            return GraphedForward(model, ids, dtype)
        return GraphedTrainStep(model, ids, dtype)
    raise ValueError(f"unknown phase {phase!r}; valid: {', '.join(PHASES + GRAPHED_PHASES)}")


# The tokens-per-step protocol: training as people train, the same for every model. Batch 1 at a
# short seq measures launch overhead; a fixed number of tokens per step measures training.
TOKENS_PER_STEP = 65_536
FIXED_STEP_DTYPE = "bf16"
FIXED_STEP_PROTOCOL = (
    "train step of batch = tokens per step // seq sequences, next-token loss over every "
    "position, bf16 autocast over fp32 weights, AdamW (fused on CUDA)"
)


def compile_once(model: nn.Module, backend: str) -> nn.Module:
    """`model` under torch.compile with `backend` for the protocol's one shape (dynamic=False:
    compiled once, never re-traced)."""
    return torch.compile(model, backend=backend, dynamic=False)


def dynamo_graphs() -> int:
    """Graphs torch.compile has made in this process so far: the difference across a compiled
    model's first run is its graph count, and more than one means graph breaks (the step runs
    in pieces with eager code between them)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def fixed_tokens_batch(tokens_per_step: int, seq: int) -> int:
    """The protocol's batch: as many whole sequences of `seq` tokens as fit `tokens_per_step`."""
    if tokens_per_step < 1 or seq < 1:
        raise ValueError(f"need tokens_per_step ≥ 1 and seq ≥ 1, got {tokens_per_step}, {seq}")
    if seq > tokens_per_step:
        raise ValueError(f"seq {seq} is longer than the {tokens_per_step} tokens of a step; "
                         f"--tokens-per-step must be at least {seq}")
    return tokens_per_step // seq


def fixed_tokens_step(model: nn.Module, tokens_per_step: int, seq: int,
                      device: torch.device | str, loss_chunk: int = 0, graphed: bool = False,
                      compiled: str | None = None):
    """The protocol's training step of `model` on seeded random ids at `seq`; with
    `loss_chunk` > 0 its loss's logits are made that many positions at a time; `graphed`:
    captured in a CUDA graph (muse.measure.graphs), else a `TrainStep`; `compiled`: the model
    under torch.compile with that backend ("inductor" fuses kernels; launched op by op, so not
    with `graphed`)."""
    batch = fixed_tokens_batch(tokens_per_step, seq)
    ids = random_ids(model.config.vocab_size, batch, seq, device, seed=seq)
    dtype = torch_dtype(FIXED_STEP_DTYPE)
    if graphed and compiled:
        raise ValueError("a step is either captured in a CUDA graph or compiled, not both")
    if graphed:
        from muse.measure.graphs import GraphedTrainStep

        return GraphedTrainStep(model, ids, dtype, loss_chunk=loss_chunk)
    if compiled:
        model = compile_once(model, compiled)
    return TrainStep(model, ids, dtype, fused=True, loss_chunk=loss_chunk)
