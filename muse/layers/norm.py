"""Scale-free normalisation of a recurrent sublayer's read-out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / RMS(x) over the last dim, computed in float32 at least, returned in x's dtype.

    A decayed state sums up to 1/(1 − λ) inputs, so with λ near 1 the AR-SSM and Hebbian read-outs
    start many times the RMS of their input and drown the 0.02-scale token embedding in the
    residual stream. Normalising the read-out per token (as RetNet and GLA normalise each head)
    keeps the recurrence exact and its contribution at the scale of the others; being per token,
    it leaves causality and streaming untouched."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    # one fused op where torch has it (a launch, not five, per call on a GPU)
    return F.rms_norm(wide, (wide.shape[-1],), eps=eps).to(x.dtype)


def _gated_out(y, gain, g):
    """The output gate: each head's read-out y (B, N, H, D_h) over its RMS, times the per-head
    gain, times SiLU of the gate's projection g (B, N, H·D_h)."""
    return (rms_normalize(y) * gain).reshape(*g.shape) * F.silu(g)


def gated_out(y: torch.Tensor, gain: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """rms_normalize(y) · gain · SiLU(g), (B, N, H·D_h), with the values and gradients of that
    composition; while grad is on it keeps y, gain and g only and forms the chain again in
    backward (elementwise and a mean over D_h), not its float32 copies and products."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, gain, g)):
        return checkpoint(_gated_out, y, gain, g, use_reentrant=False, preserve_rng_state=False)
    return _gated_out(y, gain, g)
