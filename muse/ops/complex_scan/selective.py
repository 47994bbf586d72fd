"""h_t = e^{log|λ_t| + iθ} h_{t−1} + u_t with a magnitude per step and channel (chosen by the
input) and a fixed angle θ per channel, on planar storage.

The rotation comes out exactly: with h_t = e^{iθt} g_t the recurrence becomes
g_t = |λ_t| g_{t−1} + e^{−iθt} u_t, a real decayed scan of the two planes with one decay per step
and channel (`muse.ops.decayed_scan`: the chunked form, one Triton launch each way on CUDA).
The angles θt are formed in float64 and wrapped before they meet float32.
"""

from __future__ import annotations

import math

import torch

from muse.ops.decayed_scan.chunk import selective_cumsum


def _rotation(n: int, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos θt and sin θt, (N, R), for t = 0 … n−1."""
    t = torch.arange(n, device=angle.device, dtype=torch.float64)[:, None]
    phase = torch.remainder(t * angle.to(torch.float64), 2 * math.pi)
    return torch.cos(phase), torch.sin(phase)


def complex_selective_scan(u: torch.Tensor, log_mag: torch.Tensor,
                           angle: torch.Tensor) -> torch.Tensor:
    """u (B, N, 2R) planar, log_mag (B, N, R) ≤ 0, angle (R,) → h (B, N, 2R) planar, in float32
    at least."""
    bsz, n, width = u.shape
    r = width // 2
    if width % 2 or log_mag.shape != (bsz, n, r) or angle.shape != (r,):
        raise ValueError(f"need u (B, N, 2R), log_mag (B, N, R) and angle (R,), got "
                         f"{tuple(u.shape)}, {tuple(log_mag.shape)} and {tuple(angle.shape)}")
    wide = torch.promote_types(u.dtype, torch.float32)
    cos, sin = (p.to(wide) for p in _rotation(n, angle))
    re, im = u[..., :r].to(wide), u[..., r:].to(wide)
    # e^{−iθt} u
    turned = torch.cat((re * cos + im * sin, im * cos - re * sin), dim=-1)
    decay = torch.cat((log_mag, log_mag), dim=-1).to(wide)
    if u.is_cuda:  # one launch each way instead of the chunked form's (T × T) weights
        from muse.ops.decayed_scan.triton import decayed_cumsum_triton

        g = decayed_cumsum_triton(turned.contiguous(), decay.contiguous())
    else:
        g = selective_cumsum(turned, decay)
    g_re, g_im = g[..., :r], g[..., r:]
    return torch.cat((g_re * cos - g_im * sin, g_im * cos + g_re * sin), dim=-1)
