"""h_t = λ ⊙ h_{t−1} + u_t with a complex decay per channel, on planar storage, on the GPU: one
Triton launch forward, one backward (the recurrence run from the end with conj λ).

One program owns a block of channels and walks the sequence in tiles: inside a tile an
associative scan of the affine maps h ↦ λ h + u (the decay travels as log|λ| and arg λ, whose
sums stay exact where products of a float32 λ near 1 would drift), across tiles the carried
state. Accumulation in fp32 whatever the storage dtype.

Backward, with G_t = ∂L/∂h_t written as a complex number (∂/∂Re + i ∂/∂Im): ∂L/∂u_t = G_t +
conj(λ) ∂L/∂u_{t+1}, and with S = Σ_t ∂L/∂u_t · conj(h_{t−1}) (float64, over batch and time):
∂L/∂log|λ| = Re(conj(λ) S), ∂L/∂arg λ = Im(conj(λ) S).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # positions per tile
BLOCK_R = 32  # complex channels per program; 8 when there are few, for more programs
TWO_PI = tl.constexpr(6.283185307179586)  # a jit function reads only constexpr globals


@triton.jit
def _affine(l1, t1, br1, bi1, l2, t2, br2, bi2):
    # h ↦ λ1 h + b1, then h ↦ λ2 h + b2: λ = λ2 λ1 (logs and angles add), b = λ2 b1 + b2.
    # The angle is wrapped into [−π, π): a float32 sum of 64 angles would keep only ~1e-5 rad.
    m = tl.exp(l2)
    c, s = m * tl.cos(t2), m * tl.sin(t2)
    t = t1 + t2
    t = t - TWO_PI * tl.floor(t / TWO_PI + 0.5)
    return l1 + l2, t, c * br1 - s * bi1 + br2, c * bi1 + s * br1 + bi2


@triton.jit
def _scan_kernel(u_ptr, h_ptr, log_mag_ptr, angle_ptr, n, tiles, r, stride_b, stride_n,
                 REVERSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < r
    rows = tl.arange(0, BLOCK_N)
    lm = tl.load(log_mag_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    an = tl.load(angle_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    carry_r = tl.zeros((BLOCK_R,), dtype=tl.float32)
    carry_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i in range(0, tiles):
        tile = tiles - 1 - i if REVERSE else i
        pos = tile * BLOCK_N + rows
        ok = (pos < n)[:, None] & col_ok[None, :]
        offs = pid_b * stride_b + pos[:, None] * stride_n + cols[None, :]
        ur = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        ui = tl.load(u_ptr + offs + r, mask=ok, other=0.0).to(tl.float32)
        # padding is the identity map (log|λ| 0, angle 0, input 0): it passes the carry through
        log_mag = tl.where(ok, lm[None, :], 0.0)
        angle = tl.where(ok, an[None, :], 0.0)
        tl_, tt, hr, hi = tl.associative_scan((log_mag, angle, ur, ui), 0, _affine,
                                              reverse=REVERSE)
        m = tl.exp(tl_)
        c, s = m * tl.cos(tt), m * tl.sin(tt)
        hr = hr + c * carry_r[None, :] - s * carry_i[None, :]
        hi = hi + c * carry_i[None, :] + s * carry_r[None, :]
        tl.store(h_ptr + offs, hr.to(h_ptr.dtype.element_ty), mask=ok)
        tl.store(h_ptr + offs + r, hi.to(h_ptr.dtype.element_ty), mask=ok)
        edge = 0 if REVERSE else BLOCK_N - 1
        carry_r = tl.sum(tl.where((rows == edge)[:, None], hr, 0.0), axis=0)
        carry_i = tl.sum(tl.where((rows == edge)[:, None], hi, 0.0), axis=0)


# a custom op: torch.compile keeps the launch as one opaque node instead of tracing into
# Triton, so a compiled step stays one graph
@torch.library.custom_op("muse::complex_scan", mutates_args=())
def complex_scan(u: torch.Tensor, log_mag: torch.Tensor, angle: torch.Tensor,
                 reverse: bool = False) -> torch.Tensor:
    """u (B, N, 2R) planar [re | im], log_mag and angle (R,) → h (B, N, 2R) like u with
    h_t = λ h_{t−1} + u_t (reverse: h_t = λ h_{t+1} + u_t), λ = e^{log_mag + i·angle}."""
    u = u.contiguous()
    bsz, n, width = u.shape
    r = width // 2
    h = torch.empty_like(u)
    block_r = BLOCK_R if r > 256 else 8
    grid = (bsz, triton.cdiv(r, block_r))
    # the tile count comes from the host: Triton 3.6's interpreter cannot loop to a traced bound
    tiles = triton.cdiv(n, BLOCK_N)
    _scan_kernel[grid](u, h, log_mag.float().contiguous(), angle.float().contiguous(), n, tiles,
                       r, u.stride(0), u.stride(1), REVERSE=reverse, BLOCK_N=BLOCK_N,
                       BLOCK_R=block_r)
    return h


@complex_scan.register_fake
def _(u, log_mag, angle, reverse=False):
    return u.new_empty(u.shape)


def _planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = x.shape[-1] // 2
    return x[..., :r], x[..., r:]


class ComplexScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, log_mag: torch.Tensor, angle: torch.Tensor):
        h = complex_scan(u, log_mag, angle)
        ctx.save_for_backward(h, log_mag, angle)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        h, log_mag, angle = ctx.saved_tensors
        grad_u = complex_scan(grad_h.to(h.dtype), log_mag, -angle, reverse=True)
        grad_log_mag = grad_angle = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # S = Σ G_t conj(h_{t−1}), h_{−1} = 0, in float64: B·N terms a channel
            g_re, g_im = (p[:, 1:].double() for p in _planes(grad_u))
            h_re, h_im = (p[:, :-1].double() for p in _planes(h))
            s_re = (g_re * h_re + g_im * h_im).sum(dim=(0, 1))
            s_im = (g_im * h_re - g_re * h_im).sum(dim=(0, 1))
            mag = torch.exp(log_mag.double())
            lam_re, lam_im = mag * torch.cos(angle.double()), mag * torch.sin(angle.double())
            grad_log_mag = (lam_re * s_re + lam_im * s_im).to(log_mag.dtype)
            grad_angle = (lam_re * s_im - lam_im * s_re).to(angle.dtype)
        return grad_u, grad_log_mag, grad_angle


def complex_decayed_cumsum_triton(u: torch.Tensor, log_mag: torch.Tensor,
                                  angle: torch.Tensor) -> torch.Tensor:
    """As `muse.ops.complex_scan.complex_decayed_cumsum` on planar u (B, N, 2R)."""
    return ComplexScan.apply(u, log_mag, angle)
