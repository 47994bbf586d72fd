"""h_t = e^{log|λ_t| + iθ} h_{t−1} + u_t with a magnitude per step and channel (chosen by the
input) and a fixed angle θ per channel, on planar storage.

The rotation comes out exactly: with h_t = e^{iθt} g_t the recurrence becomes
g_t = |λ_t| g_{t−1} + e^{−iθt} u_t, a real decayed scan of the two planes with one decay per step
and channel (`muse.ops.decayed_scan`: the chunked form, one Triton launch each way on CUDA).
The angles θt are formed in float64 and wrapped before they meet float32.
`complex_gated_selective_scan` also forms the decays and the LRU gain inside the same autograd
node (phase3's selective layer), so backward keeps only their inputs and the scanned planes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def _rotated_forward(u: torch.Tensor, decay: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(g, h) for wide planar u (B, N, 2R) and decays (B, N, R): g the scanned planes of
    e^{−iθt} u stacked on the batch (2B, N, R), h = e^{iθt} g planar."""
    bsz, r = u.shape[0], u.shape[-1] // 2
    # e^{−iθt} u, the two planes stacked on the batch: one scan, decays shared by both
    turned = torch.cat(_turn(u[..., :r], u[..., r:], cos, sin, back=True), dim=0)
    g = _scan(turned, torch.cat((decay, decay), dim=0))
    return g, torch.cat(_turn(g[:bsz], g[bsz:], cos, sin), dim=-1)


def _rotated_backward(grad_h, u, decay, g, cos, sin, needs: tuple[bool, bool, bool]):
    """∂L/∂u, ∂L/∂log|λ| (wide) and ∂L/∂θ (float64) from ∂L/∂h, each None unless `needs` asks;
    u and the decays wide, g and the rotations from the forward."""
    bsz, n, width = u.shape
    r = width // 2
    gh_re, gh_im = grad_h[..., :r].to(g.dtype), grad_h[..., r:].to(g.dtype)
    # ∂L/∂g: the output's rotation e^{iθt} taken back
    grad_g = torch.cat(_turn(gh_re, gh_im, cos, sin, back=True), dim=0)
    # ∂L/∂(turned u)_t carries back through a_{t+1}
    shifted = torch.cat((decay[:, 1:], torch.zeros_like(decay[:, :1])), dim=1)
    grad_t = _scan(grad_g, torch.cat((shifted, shifted), dim=0), reverse=True)
    gt_re, gt_im = grad_t[:bsz], grad_t[bsz:]
    grad_u = grad_log_mag = grad_angle = None
    if needs[0]:
        grad_u = torch.cat(_turn(gt_re, gt_im, cos, sin), dim=-1)
    if needs[1]:
        prod = grad_t[:, 1:] * g[:, :-1]
        dot = F.pad(prod[:bsz] + prod[bsz:], (0, 0, 1, 0))
        grad_log_mag = dot * torch.exp(decay)
    if needs[2]:
        # ∂/∂φ of the phase φ = θt at both rotations, then ∂φ/∂θ = t, summed in float64
        h_re, h_im = _turn(g[:bsz], g[bsz:], cos, sin)
        t_re, t_im = _turn(u[..., :r], u[..., r:], cos, sin, back=True)
        per_step = (gh_im * h_re - gh_re * h_im + gt_re * t_im - gt_im * t_re).sum(dim=0)
        steps = torch.arange(n, device=u.device, dtype=torch.float64)
        grad_angle = steps @ per_step.to(torch.float64)
    return grad_u, grad_log_mag, grad_angle


class _RotatedScan(torch.autograd.Function):
    """The whole of complex_selective_scan as one autograd node: it keeps u, the decays and the
    scanned planes g, and forms the rotations, the turned input and the output again in
    backward, where autograd through the pieces would keep each of them in float32."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, log_mag: torch.Tensor, angle: torch.Tensor):
        wide = torch.promote_types(u.dtype, torch.float32)
        cos, sin = (p.to(wide) for p in _rotation(u.shape[1], angle))
        g, h = _rotated_forward(u.to(wide), log_mag.to(wide), cos, sin)
        ctx.save_for_backward(u, log_mag, angle, g)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        u, log_mag, angle, g = ctx.saved_tensors
        wide = g.dtype
        cos, sin = (p.to(wide) for p in _rotation(u.shape[1], angle))
        grad_u, grad_log_mag, grad_angle = _rotated_backward(
            grad_h, u.to(wide), log_mag.to(wide), g, cos, sin, ctx.needs_input_grad)
        return (None if grad_u is None else grad_u.to(u.dtype),
                None if grad_log_mag is None else grad_log_mag.to(log_mag.dtype),
                None if grad_angle is None else grad_angle.to(angle.dtype))


def _gate(p, z, bias, carry, wide):
    """(z + bias, log|λ|, gain, u), all wide: log|λ_t| = −softplus(z_t + bias), the LRU gain
    √(1 − |λ_t|²), u = p·gain with the carried state (if any) added to u_0."""
    arg = z.to(wide) if bias is None else z.to(wide) + bias.to(wide)
    log_mag = -F.softplus(arg)
    gain = torch.sqrt(-torch.expm1(2 * log_mag))
    u = p.to(wide) * torch.cat((gain, gain), dim=-1)
    if carry is not None:  # h_0 = λ_0 h_{−1} + u_0: the carried state enters with the first input
        u = torch.cat((u[:, :1] + carry[:, None].to(wide), u[:, 1:]), dim=1)
    return arg, log_mag, gain, u


class _GatedRotatedScan(torch.autograd.Function):
    """complex_gated_selective_scan as one autograd node: it keeps p and z in their own dtypes
    and the scanned planes g, and forms the decays, gains and u again in backward, where
    autograd through them would keep the softplus input, two float32 intermediates of the
    gain, the gain and u."""

    @staticmethod
    def forward(ctx, p, z, angle, bias, carry):
        wide = torch.promote_types(torch.promote_types(p.dtype, z.dtype), torch.float32)
        if bias is not None:
            wide = torch.promote_types(wide, bias.dtype)
        cos, sin = (c.to(wide) for c in _rotation(p.shape[1], angle))
        _, log_mag, _, u = _gate(p, z, bias, carry, wide)
        g, h = _rotated_forward(u, log_mag, cos, sin)
        ctx.save_for_backward(p, z, angle, bias, carry, g)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        p, z, angle, bias, carry, g = ctx.saved_tensors
        need_p, need_z, need_angle, need_bias, need_carry = ctx.needs_input_grad
        need_decay = need_z or need_bias
        cos, sin = (c.to(g.dtype) for c in _rotation(p.shape[1], angle))
        arg, log_mag, gain, u = _gate(p, z, bias, carry, g.dtype)
        grad_u, grad_log_mag, grad_angle = _rotated_backward(
            grad_h, u, log_mag, g, cos, sin, (need_p or need_decay or need_carry, need_decay,
                                              need_angle))
        grad_p = grad_z = grad_bias = grad_carry = None
        if need_p:
            grad_p = (grad_u * torch.cat((gain, gain), dim=-1)).to(p.dtype)
        if need_decay:
            r = gain.shape[-1]
            grad_gain = (grad_u * p).unflatten(-1, (2, r)).sum(dim=-2)
            # ∂gain/∂log|λ| = −e^{2 log|λ|}/gain: infinite where the gain is 0, as through sqrt
            grad_log_mag = grad_log_mag - grad_gain * torch.exp(2 * log_mag) / gain
            grad_arg = -grad_log_mag * torch.sigmoid(arg)
            grad_z = grad_arg.to(z.dtype) if need_z else None
            grad_bias = grad_arg.sum(dim=(0, 1)).to(bias.dtype) if need_bias else None
        if need_carry:
            grad_carry = grad_u[:, 0].to(carry.dtype)
        if grad_angle is not None:
            grad_angle = grad_angle.to(angle.dtype)
        return grad_p, grad_z, grad_angle, grad_bias, grad_carry


def _check_shapes(u: torch.Tensor, log_mag: torch.Tensor, angle: torch.Tensor,
                  names: tuple[str, str] = ("u", "log_mag")) -> None:
    bsz, n, width = u.shape
    r = width // 2
    if width % 2 or log_mag.shape != (bsz, n, r) or angle.shape != (r,):
        raise ValueError(f"need {names[0]} (B, N, 2R), {names[1]} (B, N, R) and angle (R,), got "
                         f"{tuple(u.shape)}, {tuple(log_mag.shape)} and {tuple(angle.shape)}")


def complex_selective_scan(u: torch.Tensor, log_mag: torch.Tensor,
                           angle: torch.Tensor) -> torch.Tensor:
    """u (B, N, 2R) planar, log_mag (B, N, R) ≤ 0, angle (R,) → h (B, N, 2R) planar, in float32
    at least."""
    _check_shapes(u, log_mag, angle)
    return _RotatedScan.apply(u, log_mag, angle)


def complex_gated_selective_scan(p: torch.Tensor, z: torch.Tensor, angle: torch.Tensor,
                                 bias: torch.Tensor | None = None,
                                 carry: torch.Tensor | None = None) -> torch.Tensor:
    """complex_selective_scan(u, log|λ|, angle) with the decay and the LRU gain formed inside:
    log|λ_t| = −softplus(z_t + bias) and u = p·√(1 − |λ_t|²), plus carry (B, 2R) at t = 0 if
    given. p (B, N, 2R) planar, z (B, N, R), bias (R,) → h (B, N, 2R), in float32 at least."""
    _check_shapes(p, z, angle, ("p", "z"))
    bsz, _, width = p.shape
    if bias is not None and bias.shape != angle.shape:
        raise ValueError(f"need bias (R,) like angle, got {tuple(bias.shape)}")
    if carry is not None and carry.shape != (bsz, width):
        raise ValueError(f"need carry (B, 2R) = {(bsz, width)}, got {tuple(carry.shape)}")
    return _GatedRotatedScan.apply(p, z, angle, bias, carry)
