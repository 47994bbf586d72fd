"""Peak device memory of one training step, as someone training on a small GPU would run it:
the weights in fp32 (bf16 autocast) or in bf16 themselves, AdamW or Adafactor (torch's own:
factored second moments, no first moment), activation checkpointing where the family has it,
and the full or the chunked next-token loss. What the step holds is split into the weights,
their gradients and the optimizer's state, so a reader can see what would have to shrink.

The peak is the CUDA caching allocator's over a second step (the first one creates the
optimizer's state); there is no peak to read on other devices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from muse.measure.memory import peak_memory
from muse.measure.phases import autocast, random_ids, training_loss

OPTIMIZERS = ("adamw", "adafactor")
WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 1024**3


@dataclass(frozen=True)
class TrainMemory:
    seq: int
    batch: int
    params: int
    weight_bytes: int
    grad_bytes: int  # one gradient per weight, in the weights' dtype
    optimizer_bytes: int  # every tensor of the optimizer's state after a step
    peak_allocated_bytes: int
    peak_reserved_bytes: int

    def fits(self, gib: float) -> bool:
        """Whether the allocator's peak stayed within `gib` GiB (reserved blocks can be
        released; allocated ones are what the step needed)."""
        return self.peak_allocated_bytes <= gib * GIB

    def to_dict(self) -> dict:
        return asdict(self)


def make_optimizer(name: str, params, lr: float = 1e-4) -> torch.optim.Optimizer:
    params = list(params)
    if name == "adamw":
        # fused only where every weight is a floating CUDA tensor, as torch requires
        fused = all(p.is_cuda and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=lr, fused=fused or None)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def check_recipe(weights: str, dtype: torch.dtype) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    if dtype == torch.float16:
        raise ValueError("--dtype fp16 needs loss scaling, which this measurement does not "
                         "model; use bf16 or fp32")
    if weights == "bf16" and dtype != torch.bfloat16:
        raise ValueError(f"--weights bf16 computes in bf16, so --dtype must be bf16, got {dtype}")


def train_step_fn(model: nn.Module, ids: torch.Tensor, dtype: torch.dtype,
                  optimizer: torch.optim.Optimizer, loss_chunk: int = 0):
    def step() -> torch.Tensor:
        with autocast(ids.device, dtype):
            loss = training_loss(model, ids, loss_chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure_train_memory(model: nn.Module, seq: int, *, batch: int = 1,
                         dtype: torch.dtype = torch.bfloat16, weights: str = "fp32",
                         optimizer: str = "adamw", loss_chunk: int = 0,
                         device: torch.device | str = "cuda") -> TrainMemory:
    """`model` is moved to `device` in the `weights` dtype; random ids (seeded), two steps."""
    check_recipe(weights, dtype)
    device = torch.device(device)
    model = model.to(device=device, dtype=WEIGHTS[weights]).train()
    opt = make_optimizer(optimizer, model.parameters())
    ids = random_ids(model.config.vocab_size, batch, seq, device)
    step = train_step_fn(model, ids, dtype, opt, loss_chunk)
    stats = peak_memory(step, device)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return TrainMemory(seq, batch, params, weight_bytes, weight_bytes, optimizer_state_bytes(opt),
                       stats.peak_allocated_bytes, stats.peak_reserved_bytes)
