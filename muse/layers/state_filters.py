"""Filters on the Hebbian fast weights W (B, H, D_h, D_h) carried from one streamed segment to
the next (DESIGN §3.3). Both act between segments only, so a single forward never sees them.

SNR filter. Per batch row and head, over the D_h² entries of W (population std):

    SNR = mean|W| / std(W),    d = clamp(1 − SNR/τ, 0, 1)        (d = 0 where W = 0)
    next segment:  Γ_t ← Γ_t + c_Γ·d,    η ← η·(1 − c_η·d)

A head whose SNR is at or above the threshold τ is kept as it is (d = 0). Below it, the
memory is dominated by a few large entries over a spread of small ones (i.i.d. Gaussian
entries give SNR = √(2/π) ≈ 0.80, a sparse spiky W much less), and the next segment forgets
it faster (ΔΓ = c_Γ·d per step) and writes into it more gently (η scaled by 1 − c_η·d).
The adjustments are a controller read off the state, not a learned path: no gradient flows
through them.

Memory resonance. A fixed orthonormal basis B (D_h × M) of plane waves at zeta-zero
frequencies (see `resonance_basis`); per batch row and head

    C = Bᵀ W B,   keep_mn = [C_mn² ≥ ρ · max C²],   W ← B (keep ⊙ C) Bᵀ

so the modes whose energy is below the fraction ρ of the strongest are dropped (and, with
M < D_h, everything outside span B ⊗ span B). It is a projection: the strongest mode is kept,
so a second pass keeps the same modes and changes nothing.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from muse.layers.zeta import zeta_zeros


def state_snr(w: torch.Tensor) -> torch.Tensor:
    """(…, D_h, D_v) → (…): mean|W| / std(W) over the last two dims; +inf where W is all zero
    (an empty memory has nothing to filter)."""
    flat = w.flatten(-2)
    mean_abs = flat.abs().mean(dim=-1)
    std = flat.std(dim=-1, correction=0)
    snr = mean_abs / std
    return torch.where(mean_abs == 0, torch.full_like(snr, math.inf), snr)


def snr_adjustments(
    w: torch.Tensor, threshold: float, gamma_scale: float, eta_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SNR rule (module docstring) on W (B, H, D_h, D_v): returns (ΔΓ, η factor), each
    (B, H), for the next segment."""
    with torch.no_grad():
        w = w.to(torch.promote_types(w.dtype, torch.float32))
        deficit = (1.0 - state_snr(w) / threshold).clamp(0.0, 1.0)
        return gamma_scale * deficit, 1.0 - eta_scale * deficit


def check_snr_config(threshold: float, gamma_scale: float, eta_scale: float) -> None:
    if not threshold > 0:
        raise ValueError(f"snr_threshold must be > 0, got {threshold!r}")
    if not gamma_scale >= 0:
        raise ValueError(f"snr_gamma_scale must be ≥ 0, got {gamma_scale!r}")
    if not 0 <= eta_scale <= 1:
        raise ValueError(f"snr_eta_scale must be in [0, 1], got {eta_scale!r}")
    if gamma_scale == 0 and eta_scale == 0:
        raise ValueError(
            "snr_filter is on but snr_gamma_scale and snr_eta_scale are both 0, so it would "
            "do nothing; set one of them > 0 or turn snr_filter off"
        )


@functools.cache
def _basis(dim: int, modes: int) -> torch.Tensor:
    with torch.inference_mode(False):  # cached: must serve training after an inference call
        return _plane_wave_basis(dim, modes)


def _plane_wave_basis(dim: int, modes: int) -> torch.Tensor:
    gamma = torch.tensor(zeta_zeros(-(-modes // 2)), dtype=torch.float64)
    index = torch.arange(dim, dtype=torch.float64)[:, None] + 0.5
    waves = torch.stack((torch.cos(index * gamma), torch.sin(index * gamma)), dim=-1)
    q, r = torch.linalg.qr(waves.reshape(dim, -1)[:, :modes])
    # QR is unique once diag(R) > 0: fixes each column's sign
    return q * torch.sign(torch.diagonal(r))


def resonance_basis(dim: int, modes: int) -> torch.Tensor:
    """B (dim × modes), float64, orthonormal columns (BᵀB = I): QR (Gram–Schmidt in order) of
    the plane waves cos(γ_j (i + ½)), sin(γ_j (i + ½)), j = 1, 2, …, over the index
    i = 0 … dim − 1, taken in that order until there are `modes` of them. The zeros are the
    frequencies in radians per index: incommensurate angles, so the waves are independent and
    well conditioned (condition number ~1e5 at dim = modes = 64)."""
    if not 1 <= modes <= dim:
        raise ValueError(f"resonance modes must be in [1, {dim}] (the head size), got {modes}")
    return _basis(dim, modes).clone()


def resonance_filter(w: torch.Tensor, basis: torch.Tensor, threshold: float) -> torch.Tensor:
    """W (…, D, D) → B (keep ⊙ Bᵀ W B) Bᵀ with keep = [C² ≥ threshold · max C²] per matrix."""
    coeff = basis.transpose(0, 1) @ w @ basis
    with torch.no_grad():
        energy = coeff.detach().square()
        keep = energy >= threshold * energy.flatten(-2).amax(dim=-1)[..., None, None]
    return basis @ (coeff * keep) @ basis.transpose(0, 1)


class Resonance(nn.Module):
    """The resonance filter with its basis; the basis is held in float64 and cast to each W's
    device and dtype as it is used (a buffer would follow `.half()` down to 11 bits)."""

    def __init__(self, *, head_dim: int, modes: int, threshold: float):
        super().__init__()
        if not 0 < threshold <= 1:
            raise ValueError(f"resonance_threshold must be in (0, 1], got {threshold!r}")
        self.basis64 = resonance_basis(head_dim, modes)
        self.threshold = threshold

    def extra_repr(self) -> str:
        return f"head_dim={self.basis64.shape[0]}, modes={self.basis64.shape[1]}, " \
               f"threshold={self.threshold}"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(w.dtype, torch.float32)
        basis = self.basis64.to(device=w.device, dtype=acc)
        return resonance_filter(w.to(acc), basis, self.threshold).to(w.dtype)
