"""The fixed-tokens protocol's training step captured once in a CUDA graph and replayed: the
same recipe as `phases.TrainStep` (next-token loss, autocast over fp32 weights, fused AdamW),
one graph launch per step instead of one host launch per kernel. For fixed shapes only.

A model can be captured when its step never waits on the host (no `.item()`, no data-dependent
shapes, no host-side checks of device values); capture fails with `GraphCaptureError` naming
the first operation that did.
"""

from __future__ import annotations

import torch
from torch import nn

from muse.measure.phases import training_loss

WARMUP = 3  # eager steps on a side stream first: lazy init, Triton compiles, optimizer state


class GraphCaptureError(RuntimeError):
    """The model's training step cannot be captured in a CUDA graph."""


class GraphedTrainStep:
    """Calling it replays the captured step: forward, backward and the AdamW update, in place on
    the model's weights. The `WARMUP` eager steps before capture train the model too."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, dtype: torch.dtype,
                 lr: float = 1e-4, loss_chunk: int = 0):
        if dtype == torch.float16:
            raise ValueError("fp16 training scales its loss and checks for inf on the host every "
                             "step, which a graph cannot hold: capture bf16 or fp32")
        if ids.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, got ids on {ids.device}")
        self.model = model.to(dtype=torch.float32).train()
        self.ids, self.dtype, self.loss_chunk = ids, dtype, loss_chunk
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True,
                                           capturable=True)
        side = torch.cuda.Stream(ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream(ids.device).wait_stream(side)
        # backward inside the capture allocates the gradients in the graph's pool; each replay
        # writes them afresh
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.last_loss = self._step()
        except RuntimeError as exc:
            name = type(model).__name__
            raise GraphCaptureError(f"{name}'s training step cannot be captured in a CUDA graph: "
                                    f"{str(exc).splitlines()[0]}") from exc

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
