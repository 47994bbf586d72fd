"""Short causal depthwise convolution (kernel 2–4) with SiLU, as fla, Mamba and DeltaNet put
before q, k and v: each channel sees its last few tokens, which gives the linear-attention
features local order and n-gram shape (QUALITY.md item 2)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        y = self.conv(padded.transpose(1, 2)).transpose(1, 2)
        if self.activation:
            y = F.silu(y)
        if tail is None:
            return y
        return y, padded[:, padded.shape[1] - keep:]
