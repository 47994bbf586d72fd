"""Short causal depthwise convolution (kernel 2–4) with SiLU, as fla, Mamba and DeltaNet put
before q, k and v: each channel sees its last few tokens, which gives the linear-attention
features local order and n-gram shape (QUALITY.md item 2)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _ConvSiLU(torch.autograd.Function):
    """SiLU(depthwise conv1d(padded, weight)) as one autograd node that keeps only its inputs:
    backward forms the conv's output again (K multiply-adds an element) instead of keeping it,
    and runs the same ops' backward on it, so values and gradients are those of autograd
    through conv1d then SiLU, bit for bit. `padded` and `weight` come in the dtype the conv
    runs in (the autocast casts are made by the caller, as autograd nodes of their own)."""

    @staticmethod
    def forward(ctx, padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(padded, weight)
        return _conv_silu(padded, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        padded, weight = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(need)
                  for t, need in zip((padded, weight), ctx.needs_input_grad[:2], strict=True)]
        with torch.enable_grad(), torch.autocast(padded.device.type, enabled=False):
            y = _conv_silu(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad) if wanted else ())
        return tuple(next(grads) if t.requires_grad else None for t in leaves)


def _conv_silu(padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    with torch.autocast(padded.device.type, enabled=False):
        return F.silu(F.conv1d(padded, weight, groups=weight.shape[0]))


class ShortConv(nn.Module):
    """(B, N, C) → (B, N, C), y_t = SiLU(Σ_{i<K} w_i ⊙ x_{t−i}): left padding only. With a
    `tail` (the K−1 inputs before this segment, (B, K−1, C)) it streams and also returns the
    next tail, so segments run one after another equal one run over them all."""

    def __init__(self, channels: int, kernel_size: int = 4, activation: bool = True):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be ≥ 1, got {kernel_size}")
        self.kernel_size, self.activation = kernel_size, activation
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def init_tail(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        w = self.conv.weight
        return torch.zeros(batch, self.kernel_size - 1, w.shape[0], device=device or w.device,
                           dtype=dtype or w.dtype)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None = None):
        keep = self.kernel_size - 1
        if tail is None:
            padded = F.pad(x, (0, 0, keep, 0))
        else:
            padded = torch.cat((tail.to(x.dtype), x), dim=1)
        if self.activation:
            # one node keeping the conv's input only, not also its output for SiLU's backward
            y = _ConvSiLU.apply(*_conv_operands(padded.transpose(1, 2), self.conv.weight))
            y = y.transpose(1, 2)
        else:
            y = self.conv(padded.transpose(1, 2)).transpose(1, 2)
        if tail is None:
            return y
        return y, padded[:, padded.shape[1] - keep:]


def _conv_operands(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and the weight in the dtype a conv1d under autocast would run in (autocast's casts,
    each an autograd node whose backward returns the gradient in the original dtype)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight
    dtype = torch.get_autocast_dtype(device)
    # autocast leaves float64 as it is and casts every other floating dtype
    return tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in (x, weight))
