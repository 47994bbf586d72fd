"""What a training forward keeps for backward, by sublayer: the bytes of the tensors autograd
saves, attributed to the innermost module running when each was saved (named by its class, as
`muse profile` names sublayers). The activation part of a train step's peak memory, counted
on any device: what would have to shrink for a model to train in less memory.

Each storage counts once (views of one buffer, a tensor saved by two ops), and the weights
themselves are not counted (they exist anyway); their autocast copies are. Inside a
`torch.utils.checkpoint` region the checkpoint's own hooks hold nothing, and the inputs it keeps
for recomputing count only where another op saved them too: a lower bound there.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from muse.measure.phases import autocast, compile_once, training_loss

OUTSIDE = "(outside the blocks)"


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_bytes_by_sublayer(model: nn.Module, ids: torch.Tensor, dtype: torch.dtype,
                            loss_chunk: int = 0) -> dict[str, int]:
    """{module class: bytes saved for backward} over one training forward of `model` on ids
    (autocast to dtype, the next-token loss), largest first; OUTSIDE holds what was saved
    outside every block (embedding, head, loss)."""
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    inside = {id(m) for blocks_ in blocks for m in blocks_.modules()}
    weights = {_storage(p)[0] for p in model.parameters()}
    stack: list[str] = []
    seen: set[int] = set()
    total: dict[str, int] = defaultdict(int)

    def enter(module, _args):
        stack.append(type(module).__name__)

    def leave(module, _args, _out):
        stack.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage(t)
        if ptr not in weights and ptr not in seen and nbytes:
            seen.add(ptr)
            total[stack[-1] if stack else OUTSIDE] += nbytes
        return t

    handles = []
    for m in model.modules():
        if id(m) in inside and not isinstance(m, nn.ModuleList):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                autocast(ids.device, dtype):
            loss = training_loss(model, ids, loss_chunk)
    finally:
        for h in handles:
            h.remove()
    del loss
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


COMPILED = "(compiled: every sublayer)"


def saved_bytes_compiled(model: nn.Module, ids: torch.Tensor, dtype: torch.dtype,
                         loss_chunk: int = 0, backend: str = "inductor") -> dict[str, int]:
    """{COMPILED: bytes saved for backward} by one training forward of `model` under
    torch.compile (compiled and run once untimed first): what its partitioner keeps, which
    recomputes cheap ops rather than saving them. No sublayers: fused kernels cross them."""
    weights = {_storage(p)[0] for p in model.parameters()}
    run = compile_once(model.train(), backend)
    with autocast(ids.device, dtype):
        training_loss(run, ids, loss_chunk).backward()
    model.zero_grad(set_to_none=True)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage(t)
        if ptr not in weights and nbytes:
            seen[ptr] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(ids.device, dtype):
        loss = training_loss(run, ids, loss_chunk)
    del loss
    return {COMPILED: sum(seen.values())}
