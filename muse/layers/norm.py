"""Scale-free normalisation of a recurrent sublayer's read-out."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
