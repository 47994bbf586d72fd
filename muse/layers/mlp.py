"""The position-wise GELU MLP shared by the baselines and the MUSE families."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, *, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class SwiGLU(nn.Module):
    """down(SiLU(gate x) ⊙ up x) (Shazeer 2020), the FFN of Llama-style "Transformer++"
    bodies that published linear-attention models are measured in. Hidden width ⅔·d_ff
    rounded up to a multiple of 64: three matrices hold what the two of a d_ff MLP hold."""

    def __init__(self, *, d_model: int, d_ff: int):
        super().__init__()
        hidden = -(-2 * d_ff // 3 // 64) * 64
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
