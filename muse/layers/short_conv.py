"""Short causal depthwise convolution (kernel 2–4) with SiLU, as fla, Mamba and DeltaNet put
before q, k and v: each channel sees its last few tokens, which gives the linear-attention
features local order and n-gram shape (QUALITY.md item 2)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from muse.layers.cast import autocast_operands
from muse.ops.short_conv.naive import causal_depthwise

BACKENDS = ("auto", "triton", "torch")


def conv_silu(padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`_conv_silu` keeping only its inputs for backward while grad is on."""
    if torch.is_grad_enabled() and (padded.requires_grad or weight.requires_grad):
        return checkpoint(_conv_silu, padded, weight, use_reentrant=False,
                          preserve_rng_state=False)
    return _conv_silu(padded, weight)


def _conv_silu(padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    with torch.autocast(padded.device.type, enabled=False):
        return F.silu(causal_depthwise(padded, weight))


class ShortConv(nn.Module):
    """(B, N, C) → (B, N, C), y_t = SiLU(Σ_{i<K} w_i ⊙ x_{t−i}): left padding only. With a
    `tail` (the K−1 inputs before this segment, (B, K−1, C)) it streams and also returns the
    next tail, so segments run one after another equal one run over them all. `backend`
    "triton" runs a whole sequence (no tail) as one Triton launch forward and one backward
    (muse.ops.short_conv.triton), "torch" as shifted multiply-adds; "auto" takes Triton on
    CUDA where a sequence's N × C fits the kernels' int32 offsets."""

    def __init__(self, channels: int, kernel_size: int = 4, activation: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be ≥ 1, got {kernel_size}")
        if backend not in BACKENDS:
            raise ValueError(f"short conv backend must be one of {', '.join(BACKENDS)}, got "
                             f"{backend!r}")
        self.kernel_size, self.activation, self.backend = kernel_size, activation, backend
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def init_tail(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        w = self.conv.weight
        return torch.zeros(batch, self.kernel_size - 1, w.shape[0], device=device or w.device,
                           dtype=dtype or w.dtype)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None = None):
        keep = self.kernel_size - 1
        if tail is None and self._triton(x):
            from muse.ops.short_conv.triton import short_conv_triton  # triton: CUDA installs

            return short_conv_triton(*autocast_operands(x, self.conv.weight), self.activation)
        if tail is None:
            padded = F.pad(x, (0, 0, keep, 0))
        else:
            padded = torch.cat((tail.to(x.dtype), x), dim=1)
        operands = autocast_operands(padded, self.conv.weight)
        if self.activation:
            # the conv's output formed again in backward (K multiply-adds an element), not kept
            # for SiLU's backward
            y = conv_silu(*operands)
        else:
            y = causal_depthwise(*operands)
        if tail is None:
            return y
        return y, padded[:, padded.shape[1] - keep:]

    def _triton(self, x: torch.Tensor) -> bool:
        if self.backend != "auto":
            return self.backend == "triton"
        if not x.is_cuda:
            return False
        from muse.ops.short_conv.triton import fits

        return fits(x)

