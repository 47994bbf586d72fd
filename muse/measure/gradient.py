"""Gradient flow with the loss on the last token only.

A first-layer *parameter* gradient is non-zero even for a model that ignores its context (the
last token's own path runs through layer 0), so the real long-range signal is measured at the
input: ‖∂ℓ_b/∂h₀[b, t]‖ for every position t, h₀ being the output of `model.embed` and ℓ_b the
last-token loss of sequence b alone, averaged over the batch and summarised per position
bucket, so a metric means the same at every batch size. Every sequence's last token has the
same random target. Models expose `embed` and `blocks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.measure.phases import autocast


@dataclass
class PositionBucket:
    start: int  # first position, inclusive
    stop: int  # last position, exclusive
    mean_grad_norm: float
    max_grad_norm: float


@dataclass
class GradientFlow:
    loss: float
    loss_scale: float  # fp16 loss scale the gradients were taken at (then divided out)
    finite: bool
    nonfinite_params: list[str]
    layer_grad_norms: list[float]  # one per block, parameters of the block together
    first_layer_grad_norm: float
    embedding_grad_norm: float
    buckets: list[PositionBucket] = field(default_factory=list)

    @property
    def long_range_grad_norm(self) -> float:
        """Mean ‖∂ℓ_b/∂h₀[b, t]‖ over the first position bucket (the farthest context) and the
        batch: one sequence's last-token loss, whatever the batch size."""
        return self.buckets[0].mean_grad_norm


def _norm(tensors: list[torch.Tensor | None]) -> float:
    grads = [t.detach().float() for t in tensors if t is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def position_buckets(per_position: torch.Tensor, n_buckets: int) -> list[PositionBucket]:
    n = per_position.numel()
    edges = [round(i * n / n_buckets) for i in range(n_buckets + 1)]
    out = []
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        if stop > start:
            chunk = per_position[start:stop]
            out.append(PositionBucket(start, stop, float(chunk.mean()), float(chunk.max())))
    return out


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BackwardProbe:
    loss: float
    loss_scale: float  # fp16 loss scale the gradients were taken at (already divided out)
    finite: bool
    nonfinite_params: list[str]
    h0_grad: torch.Tensor  # ∂L/∂h₀, fp32, [B, N, D]


def backward_probe(
    model: nn.Module, ids: torch.Tensor, dtype: torch.dtype, loss_fn: LossFn
) -> BackwardProbe:
    """One backward pass with fp32 weights under autocast. For fp16 the loss is scaled the way
    GradScaler does (start at 2¹⁶, halve on overflow) so small gradients are not flushed to zero
    by the format; the scale is divided out of every gradient before anything is read."""
    model.to(dtype=torch.float32).train()
    scale = 2.0**16 if dtype == torch.float16 else 1.0
    while True:
        captured: dict[str, torch.Tensor] = {}

        def keep(_module, _inputs, output, captured=captured):
            output.retain_grad()
            captured["h0"] = output

        handle = model.embed.register_forward_hook(keep)
        try:
            model.zero_grad(set_to_none=True)
            with autocast(ids.device, dtype):
                loss = loss_fn(model(ids), ids)
            (loss * scale).backward()
        finally:
            handle.remove()
        h0_grad = captured["h0"].grad.float()
        nonfinite = [
            n
            for n, p in model.named_parameters()
            if p.grad is not None and not p.grad.isfinite().all()
        ]
        finite = not nonfinite and bool(torch.isfinite(loss)) and bool(h0_grad.isfinite().all())
        if finite or scale <= 1.0 or not torch.isfinite(loss):
            break
        scale /= 2.0
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(scale)
    return BackwardProbe(float(loss.detach()), scale, finite, nonfinite, h0_grad / scale)


def layer_grad_norms(model: nn.Module) -> list[float]:
    return [_norm([p.grad for p in block.parameters()]) for block in model.blocks]


def gradient_flow(
    model: nn.Module,
    ids: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    n_buckets: int = 8,
    seed: int = 0,
) -> GradientFlow:
    gen = torch.Generator().manual_seed(seed)
    batch = ids.shape[0]
    target = torch.randint(0, model.config.vocab_size, (1,), generator=gen).to(ids.device)
    target = target.expand(batch)

    def last_token_loss(logits: torch.Tensor, _ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, -1].float(), target)

    probe = backward_probe(model, ids, dtype, last_token_loss)
    layers = layer_grad_norms(model)
    return GradientFlow(
        loss=probe.loss,
        loss_scale=probe.loss_scale,
        finite=probe.finite,
        nonfinite_params=probe.nonfinite_params,
        layer_grad_norms=layers,
        first_layer_grad_norm=layers[0],
        embedding_grad_norm=_norm([p.grad for p in model.embed.parameters()]),
        # The loss is the batch mean, and h₀[b] reaches only ℓ_b: ∂ℓ_b/∂h₀[b] = B·∂L/∂h₀[b].
        buckets=position_buckets((probe.h0_grad * batch).norm(dim=-1).mean(dim=0), n_buckets),
    )
