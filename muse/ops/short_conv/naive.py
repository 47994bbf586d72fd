"""The short causal depthwise conv in PyTorch: the reference for the Triton kernels and the form
every device runs without them."""

from __future__ import annotations

import torch


def causal_depthwise(padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, K−1 + N, C) left-padded input, a depthwise Conv1d weight (C, 1, K) → (B, N, C):
    y_t = Σ_j w_j ⊙ padded_{t+j}, as conv1d, summed in float32 at least and returned in the
    input's dtype. K shifted multiply-adds in the (B, N, C) layout: no transposes, and
    torch.compile fuses them with the SiLU into one pass."""
    k = weight.shape[-1]
    n = padded.shape[1] - k + 1
    acc = torch.promote_types(padded.dtype, torch.float32)
    w = weight[:, 0].to(acc)  # (C, K)
    y = padded[:, k - 1:] * w[:, k - 1]
    for j in range(k - 1):  # in place: one float32 (B, N, C) alive, not a product beside it
        y.addcmul_(padded[:, j:j + n], w[:, j])
    return y.to(padded.dtype)
