"""Holographic tensor-train (HTT) embedding: a rank-r factorised V×D table (DESIGN.md §3.2).

V is split as v1 = ⌈√V⌉, v2 = ⌈V/v1⌉ and D as d1 = ⌈√D⌉, d2 = ⌈D/d1⌉; token id maps to
(i1, i2) = (id div v2, id mod v2) and

    E[id] = (1/√r) Σ_ρ cos θ_ρ · (ĉ1_ρ ⊗ ĉ2_ρ),  ĉ1_ρ = C1[i1, ρ] / ‖C1[i1, ρ]‖₂ (same for ĉ2),

flattened to d1·d2 and cropped to D. Parameters: v1·r·d1 + v2·r·d2 + r (≈ 0.6% of V·D at
V = 50257, D = 512, r = 16).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from muse.layers import count_params


def _factor(n: int) -> tuple[int, int]:
    a = math.isqrt(n - 1) + 1  # ⌈√n⌉ in exact integer arithmetic, n ≥ 1
    return a, -(-n // a)


def htt_param_count(vocab_size: int, d_model: int, rank: int) -> int:
    """v1·r·d1 + v2·r·d2 + r."""
    v1, v2 = _factor(vocab_size)
    d1, d2 = _factor(d_model)
    return v1 * rank * d1 + v2 * rank * d2 + rank


class HTTEmbedding(nn.Module):
    """Token ids (B, N) → embeddings (B, N, D), gathered from the cores; no V×D table is built
    except by `full_table()` (for a tied output head: logits = h @ full_table().T)."""

    def __init__(self, *, vocab_size: int, d_model: int, rank: int = 16):
        super().__init__()
        if vocab_size < 1 or d_model < 1 or rank < 1:
            raise ValueError(f"vocab_size, d_model, rank must be ≥ 1, got {vocab_size}, "
                             f"{d_model}, {rank}")
        self.vocab_size, self.d_model, self.rank = vocab_size, d_model, rank
        self.v1, self.v2 = _factor(vocab_size)
        self.d1, self.d2 = _factor(d_model)
        # Core entries N(0, 1): only the direction of each slice matters (it is normalised), and
        # a Gaussian slice is zero with probability 0. No epsilon in the norm: a zero slice would
        # be a real failure and must show as a non-finite value. Training keeps norms away from
        # zero by itself: the gradient of c/‖c‖ is orthogonal to c, so a plain gradient step
        # can only lengthen the slice (‖c + δ‖² = ‖c‖² + ‖δ‖²); only weight decay shrinks it.
        self.core1 = nn.Parameter(torch.randn(self.v1, rank, self.d1))
        self.core2 = nn.Parameter(torch.randn(self.v2, rank, self.d2))
        # θ spread over [π/8, 3π/8]: cos θ in [0.38, 0.92] (RMS ≈ 0.71), and sin θ ≠ 0 so θ gets
        # gradient (at θ = 0 it would get none). The r unit tensors ĉ1⊗ĉ2 are nearly orthogonal,
        # so a row has ‖E[id]‖₂ ≈ RMS(cos θ) ≈ 0.71 and per-entry RMS ≈ 0.71/√(d1·d2):
        # 0.031 at D = 512, the scale of GPT-2's nn.Embedding (std 0.02).
        if rank == 1:
            theta = torch.tensor([math.pi / 4])
        else:
            theta = torch.linspace(math.pi / 8, 3 * math.pi / 8, rank)
        self.theta = nn.Parameter(theta)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, d_model={self.d_model}, rank={self.rank}, "
                f"v=({self.v1}, {self.v2}), d=({self.d1}, {self.d2})")

    def num_params(self) -> int:
        return count_params(self)

    def _check_ids(self, ids: torch.Tensor) -> None:
        # Checked on CPU only, outside torch.compile (the read would split the graph): on an
        # accelerator min()/max() would force a host sync every step. There an id in
        # [V, v1·v2) silently reads a padding slot of the cores, and an id ≥ v1·v2 fails in the
        # gather with a device-side assert.
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.device.type == "cpu" and ids.numel() > 0 and not torch.compiler.is_compiling():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}), "
                                 f"got min {lo}, max {hi}")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(ids)
        c1 = self.core1[ids // self.v2]  # (B, N, r, d1)
        c2 = self.core2[ids % self.v2]  # (B, N, r, d2)
        c1 = c1 / torch.linalg.vector_norm(c1, dim=-1, keepdim=True)
        c2 = c2 / torch.linalg.vector_norm(c2, dim=-1, keepdim=True)
        c1 = c1 * (torch.cos(self.theta) / math.sqrt(self.rank))[:, None]
        # Σ_ρ c1_ρ ⊗ c2_ρ as one batched (d1 × r) @ (r × d2) product: no (r, d1, d2) intermediate.
        out = c1.transpose(-1, -2) @ c2  # (B, N, d1, d2)
        return out.flatten(-2)[..., : self.d_model]

    def full_table(self) -> torch.Tensor:
        """The whole (V, D) table at once: one (v1·d1 × r) @ (r × v2·d2) product, then a
        permute; at V = 50257, D = 512 that is v1·v2·d1·d2 ≈ 27M entries (107 MB in float32)."""
        c1 = self.core1 / torch.linalg.vector_norm(self.core1, dim=-1, keepdim=True)
        c2 = self.core2 / torch.linalg.vector_norm(self.core2, dim=-1, keepdim=True)
        c1 = c1 * (torch.cos(self.theta) / math.sqrt(self.rank))[:, None]
        left = c1.permute(0, 2, 1).reshape(self.v1 * self.d1, self.rank)  # (i1, k) × ρ
        right = c2.permute(1, 0, 2).reshape(self.rank, self.v2 * self.d2)  # ρ × (i2, l)
        table = (left @ right).view(self.v1, self.d1, self.v2, self.d2).permute(0, 2, 1, 3)
        table = table.reshape(self.v1 * self.v2, self.d1 * self.d2)
        return table[: self.vocab_size, : self.d_model]
