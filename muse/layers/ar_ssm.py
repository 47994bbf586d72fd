"""AR-SSM: a depthwise causal conv plus a gated low-rank decayed state (DESIGN.md §3.2).

    local = depthwise causal conv(x)               (left padding only: y_t never reads x_{t+1})
    g     = σ(MLP(x)) ∈ (0, 1)^r                   (g = 1 without soft gating)
    u = (U x) ⊙ g,  w = (W x) ⊙ g
    s_t   = λ ⊙ s_{t−1} + u_t,  λ = exp(−softplus(ν)) ∈ (0, 1]^r
    y     = local + W_o(s ⊙ w)                     (s ⊙ w / RMS(s ⊙ w) with out_norm, the default)

λ does not depend on t, so the recurrence is computed in chunked matrix form
(muse.ops.decayed_scan.chunk: per chunk a lower-triangular matrix of powers of λ, chunk ends carried
by the same recurrence one level up), never a loop over tokens. On CUDA the same recurrence runs
as one Triton scan (muse.ops.decayed_scan.triton): same values, a fortieth of the launches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from muse.layers import count_params
from muse.layers.cast import autocast_read
from muse.layers.norm import rms_normalize
from muse.ops.decayed_scan.chunk import decayed_cumsum

State = dict[str, torch.Tensor]


class ARSSM(nn.Module):
    """(B, N, D) → (B, N, D), causal. `forward(x, state)` streams: it also returns the state
    after the last token, so segments run one after another equal one run over them all."""

    def __init__(
        self,
        *,
        d_model: int,
        rank: int,
        kernel_size: int = 3,
        gate_hidden: int = 0,  # 0: the gate MLP is one Linear D→r; else D→hidden→GELU→r
        soft_gating: bool = True,  # False: g = 1, no gate parameters
        rank_warmup_steps: int = 0,  # 0: off; else the active rank grows 1 → r over these steps
        decay_init: tuple[float, float] = (0.9, 0.999),  # λ at init, spread over the r components
        out_norm: bool = True,  # s ⊙ w divided by its RMS over the rank (see layers.norm)
    ):
        super().__init__()
        if kernel_size < 1 or rank < 1:
            raise ValueError(f"kernel_size and rank must be ≥ 1, got {kernel_size}, {rank}")
        lo, hi = decay_init
        if not 0 < lo <= hi < 1:
            raise ValueError(f"decay_init must satisfy 0 < lo ≤ hi < 1, got {decay_init}")
        self.d_model, self.rank, self.kernel_size = d_model, rank, kernel_size
        self.soft_gating, self.rank_warmup_steps = soft_gating, rank_warmup_steps
        self.out_norm = out_norm
        # causal: K − 1 zeros on both sides, and only the outputs that end on an input are kept
        # (`forward`); zeros added inside the conv, not by F.pad, let it keep its input for
        # backward as it is: the one autocast copy that the projections keep too
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model,
                              padding=kernel_size - 1)
        if not soft_gating:
            self.gate = None
        elif gate_hidden:
            self.gate = nn.Sequential(
                nn.Linear(d_model, gate_hidden), nn.GELU(), nn.Linear(gate_hidden, rank)
            )
        else:
            self.gate = nn.Linear(d_model, rank)
        self.proj_u = nn.Linear(d_model, rank, bias=False)
        self.proj_w = nn.Linear(d_model, rank, bias=False)
        self.proj_out = nn.Linear(rank, d_model, bias=False)
        # λ = exp(−softplus(ν)) < 1 for every finite ν and → 1 as ν → −∞; the inverse map gives
        # ν for λ spread geometrically in [lo, hi] (memories of ~10 to ~1000 tokens).
        decay = torch.exp(torch.linspace(math.log(lo), math.log(hi), rank))
        self.decay_logit = nn.Parameter(torch.log(torch.expm1(-torch.log(decay))))
        # Rank warm-up counter: advanced by each training-mode forward (see `_rank_mask`).
        self.register_buffer("warmup_step", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, rank={self.rank}, kernel_size={self.kernel_size}, "
                f"soft_gating={self.soft_gating}, rank_warmup_steps={self.rank_warmup_steps}")

    def num_params(self) -> int:
        return count_params(self)

    def decay(self) -> torch.Tensor:
        """λ ∈ (0, 1]^r."""
        return torch.exp(-F.softplus(self.decay_logit))

    def init_state(
        self, batch: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """The state before any token: the last kernel_size−1 inputs (zeros, as the conv's left
        padding) and the recurrent state s (zeros)."""
        ref = self.proj_u.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        return {
            "conv": torch.zeros(batch, self.kernel_size - 1, self.d_model, device=device,
                                dtype=dtype),
            "ssm": torch.zeros(batch, self.rank, device=device, dtype=dtype),
        }

    def _rank_mask(self) -> torch.Tensor | None:
        """Training with warm-up on: components ρ ≥ r_active are masked, r_active = 1 +
        (r−1)·step/warmup_steps (floored, reaching r at the last step). Computed from the
        buffer as tensors, so there is no host sync. The counter advances once per
        training-mode forward; a checkpointed recompute would advance it again, so a model that
        checkpoints this layer should leave warm-up off or account for the doubled count."""
        if not (self.training and self.rank_warmup_steps > 0):
            return None
        steps = self.rank_warmup_steps
        active = 1 + (self.rank - 1) * self.warmup_step.clamp(max=steps) // steps
        mask = torch.arange(self.rank, device=active.device) < active
        self.warmup_step.add_(1)
        return mask

    def forward(
        self, x: torch.Tensor, state: State | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, State]:
        streaming = state is not None
        n, keep = x.shape[1], self.kernel_size - 1
        # Local: output t reads x_{t−K+1} … x_t, nothing on the right. Without a state the conv's
        # own zeros stand before x and its first N outputs are kept (the stateless path builds
        # no state, as every op costs a launch); with one the carried K − 1 inputs go in front
        # and the outputs from K − 1 on are kept (those before read the conv's zeros).
        if streaming:
            padded = torch.cat((state["conv"].to(x.dtype), x), dim=1)
            local = self.conv(padded.transpose(1, 2))[..., keep:keep + n].transpose(1, 2)
        else:
            local = self.conv(autocast_read(x).transpose(1, 2))[..., :n].transpose(1, 2)

        # Global: gated low-rank state, s_t = λ ⊙ s_{t−1} + u_t. Every projection reads the one
        # autocast copy of x (layers.cast).
        gate = torch.sigmoid(self.gate(autocast_read(x))) if self.gate is not None else None
        mask = self._rank_mask()
        if mask is not None:
            mask = mask.to(x.dtype)
            gate = mask if gate is None else gate * mask
        u, w = self.proj_u(autocast_read(x)), self.proj_w(autocast_read(x))
        if gate is not None:
            u, w = u * gate, w * gate
        if streaming:
            decay = self.decay().to(x.dtype)
            carried = decay * state["ssm"][:, None].to(x.dtype)
            u = torch.cat((u[:, :1] + carried, u[:, 1:]), dim=1)
        if u.is_cuda:
            from muse.ops.decayed_scan.triton import decayed_cumsum_triton as scan
        else:
            scan = decayed_cumsum
        s = scan(u, -F.softplus(self.decay_logit))
        read = s * w
        if self.out_norm:
            read = rms_normalize(read)
        y = local + self.proj_out(read)

        if not streaming:
            return y
        return y, {"conv": padded[:, padded.shape[1] - keep :], "ssm": s[:, -1]}
