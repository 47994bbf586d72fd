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


def _turn(re, im, cos, sin, back: bool = False):
    """The planes (re, im) times e^{iθt} (or e^{−iθt} with `back`)."""
    if back:
        return re * cos + im * sin, im * cos - re * sin
    return re * cos - im * sin, im * cos + re * sin


def _scan(u: torch.Tensor, log_decay: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """s_t = a_t s_{t∓1} + u_t for (B, N, R) u and decays, outside autograd: one Triton launch on
    CUDA, the chunked form elsewhere (reverse: the same on the flipped sequence)."""
    if u.is_cuda:
        from muse.ops.decayed_scan.triton import linear_scan

        return linear_scan(u, log_decay, reverse=reverse)
    if reverse:
        return selective_cumsum(u.flip(1), log_decay.flip(1)).flip(1)
    return selective_cumsum(u, log_decay)


class _RotatedScan(torch.autograd.Function):
    """The whole of complex_selective_scan as one autograd node: it keeps u, the decays and the
    scanned planes g, and forms the rotations, the turned input and the output again in
    backward, where autograd through the pieces would keep each of them in float32."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, log_mag: torch.Tensor, angle: torch.Tensor):
        bsz, n, width = u.shape
        r = width // 2
        wide = torch.promote_types(u.dtype, torch.float32)
        cos, sin = (p.to(wide) for p in _rotation(n, angle))
        re, im = u[..., :r].to(wide), u[..., r:].to(wide)
        # e^{−iθt} u, the two planes stacked on the batch: one scan, decays shared by both
        turned = torch.cat(_turn(re, im, cos, sin, back=True), dim=0)
        decay = log_mag.to(wide)
        g = _scan(turned, torch.cat((decay, decay), dim=0))
        ctx.save_for_backward(u, log_mag, angle, g)
        return torch.cat(_turn(g[:bsz], g[bsz:], cos, sin), dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        u, log_mag, angle, g = ctx.saved_tensors
        bsz, n, width = u.shape
        r = width // 2
        wide = g.dtype
        cos, sin = (p.to(wide) for p in _rotation(n, angle))
        gh_re, gh_im = grad_h[..., :r].to(wide), grad_h[..., r:].to(wide)
        # ∂L/∂g: the output's rotation e^{iθt} taken back
        grad_g = torch.cat(_turn(gh_re, gh_im, cos, sin, back=True), dim=0)
        decay = log_mag.to(wide)
        # ∂L/∂(turned u)_t carries back through a_{t+1}
        shifted = torch.cat((decay[:, 1:], torch.zeros_like(decay[:, :1])), dim=1)
        grad_t = _scan(grad_g, torch.cat((shifted, shifted), dim=0), reverse=True)
        gt_re, gt_im = grad_t[:bsz], grad_t[bsz:]
        grad_u = grad_log_mag = grad_angle = None
        if ctx.needs_input_grad[0]:
            grad_u = torch.cat(_turn(gt_re, gt_im, cos, sin), dim=-1).to(u.dtype)
        if ctx.needs_input_grad[1]:
            prod = grad_t[:, 1:] * g[:, :-1]
            dot = torch.nn.functional.pad(prod[:bsz] + prod[bsz:], (0, 0, 1, 0))
            grad_log_mag = (dot * torch.exp(decay)).to(log_mag.dtype)
        if ctx.needs_input_grad[2]:
            # ∂/∂φ of the phase φ = θt at both rotations, then ∂φ/∂θ = t, summed in float64
            h_re, h_im = _turn(g[:bsz], g[bsz:], cos, sin)
            t_re, t_im = _turn(u[..., :r].to(wide), u[..., r:].to(wide), cos, sin, back=True)
            per_step = (gh_im * h_re - gh_re * h_im + gt_re * t_im - gt_im * t_re).sum(dim=0)
            steps = torch.arange(n, device=u.device, dtype=torch.float64)
            grad_angle = (steps @ per_step.to(torch.float64)).to(angle.dtype)
        return grad_u, grad_log_mag, grad_angle


def complex_selective_scan(u: torch.Tensor, log_mag: torch.Tensor,
                           angle: torch.Tensor) -> torch.Tensor:
    """u (B, N, 2R) planar, log_mag (B, N, R) ≤ 0, angle (R,) → h (B, N, 2R) planar, in float32
    at least."""
    bsz, n, width = u.shape
    r = width // 2
    if width % 2 or log_mag.shape != (bsz, n, r) or angle.shape != (r,):
        raise ValueError(f"need u (B, N, 2R), log_mag (B, N, R) and angle (R,), got "
                         f"{tuple(u.shape)}, {tuple(log_mag.shape)} and {tuple(angle.shape)}")
    return _RotatedScan.apply(u, log_mag, angle)
