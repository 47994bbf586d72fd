"""Workloads captured once in a CUDA graph and replayed: one graph launch per call instead of one
host launch per kernel, for fixed shapes only. `GraphedTrainStep` is the fixed-tokens protocol's
training step (the recipe of `phases.TrainStep`: next-token loss, autocast over fp32 weights,
fused AdamW); `GraphedForward` is the inference forward of `phases.forward_fn`. Timed at batch 1
they measure the device's work without the launch overhead that flattens short seqs.

A model can be captured when its step never waits on the host (no `.item()`, no data-dependent
shapes, no host-side checks of device values); capture fails with `GraphCaptureError` naming
the first operation that did.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from muse.measure.phases import forward_fn, training_loss

WARMUP = 3  # eager calls on a side stream first: lazy init, Triton compiles, optimizer state


class GraphCaptureError(RuntimeError):
    """The model's workload cannot be captured in a CUDA graph."""


def _needs_cuda(ids: torch.Tensor) -> None:
    if ids.device.type != "cuda":
        raise ValueError(f"a CUDA graph needs a CUDA device, got ids on {ids.device}")


def capture(fn: Callable[[], object], device: torch.device, what: str,
            reset: Callable[[], None] = lambda: None
            ) -> tuple[torch.cuda.CUDAGraph, object, int]:
    """`fn` run `WARMUP` times on a side stream, then captured once: the graph, what the
    captured call returned (its tensors live in the graph's pool) and the peak allocated bytes
    while capturing. A replay allocates nothing: the pool holds, for the graph's life, what
    capture allocated, so that peak is the replayed workload's. `reset` runs before each call;
    `what` names the workload in a `GraphCaptureError`."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            reset()
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    reset()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except RuntimeError as exc:
        raise GraphCaptureError(f"{what} cannot be captured in a CUDA graph: "
                                f"{str(exc).splitlines()[0]}") from exc
    return graph, out, int(torch.cuda.max_memory_allocated(device))


class GraphedForward:
    """Calling it replays the captured forward: weights in `dtype`, eval mode, inference mode;
    `logits` holds the output that each replay overwrites."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, dtype: torch.dtype):
        _needs_cuda(ids)
        self.model, self.ids = model, ids  # the graph reads their memory: they outlive it here
        self.graph, self.logits, self.capture_peak_bytes = capture(
            forward_fn(model, ids, dtype), ids.device, f"{type(model).__name__}'s forward")

    def __call__(self) -> None:
        self.graph.replay()


class GraphedTrainStep:
    """Calling it replays the captured step: forward, backward and the AdamW update, in place on
    the model's weights. The `WARMUP` eager steps before capture train the model too."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, dtype: torch.dtype,
                 lr: float = 1e-4, loss_chunk: int = 0):
        if dtype == torch.float16:
            raise ValueError("fp16 training scales its loss and checks for inf on the host every "
                             "step, which a graph cannot hold: capture bf16 or fp32")
        _needs_cuda(ids)
        self.model = model.to(dtype=torch.float32).train()
        self.ids, self.dtype, self.loss_chunk = ids, dtype, loss_chunk
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True,
                                           capturable=True)
        # set_to_none before the capture too: backward inside it allocates the gradients in the
        # graph's pool, and each replay writes them afresh
        self.graph, self.last_loss, self.capture_peak_bytes = capture(
            self._step, ids.device, f"{type(model).__name__}'s training step",
            reset=lambda: self.optimizer.zero_grad(set_to_none=True))

    def _step(self) -> torch.Tensor:
        # autocast's cast cache would keep tensors made outside the graph: off under capture
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            loss = training_loss(self.model, self.ids, self.loss_chunk)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self) -> None:
        self.graph.replay()
