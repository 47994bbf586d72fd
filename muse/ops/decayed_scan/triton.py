"""s_t = a_t ⊙ s_{t−1} + u_t on the GPU: one Triton launch forward, one backward.

Two uses. The AR-SSM's state, where a_t = λ is one decay per channel: the chunked matrix form
(`muse.ops.decayed_scan.chunk`) is exact, but at batch 1 it is ~40 small PyTorch ops per call,
whose launches, not their kernels, take most of the AR-SSM's time. And the Hebbian state carried
from chunk to chunk, where a_t is one decay per (sequence, step), shared by the D_h² entries of
the state.

One program owns a block of channels and walks the sequence in tiles: inside a tile an
associative scan of the affine maps s ↦ a s + u, across tiles the carried state. Accumulation
in fp32 whatever the input dtype.

Backward: with ḡ = ∂L/∂s, ∂L/∂u_t = ḡ_t + a_{t+1} ∂L/∂u_{t+1} — the same recurrence run from
the end with the decays shifted by one — and ∂L/∂a_t = Σ (∂L/∂u_t) · s_{t−1}, summed over what
shares a_t; so ∂L/∂log a_t = a_t · that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 128  # positions per tile
BLOCK_R = 32  # channels per program; 8 when there are few channels, for more programs


@triton.jit
def _affine(l1, b1, l2, b2):
    # s ↦ e^{l1} s + b1, then s ↦ e^{l2} s + b2. The decays travel as logs: a float32 λ near 1
    # keeps few digits of 1 − λ, and products of it drift; a sum of log λ stays exact.
    return l1 + l2, b1 * tl.exp(l2) + b2


@triton.jit
def _scan_kernel(u_ptr, s_ptr, log_a_ptr, n, tiles, r, stride_b, stride_n, a_sb, a_sn, a_sr,
                 REVERSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < r
    rows = tl.arange(0, BLOCK_N)
    carry = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i in range(0, tiles):
        tile = tiles - 1 - i if REVERSE else i
        pos = tile * BLOCK_N + rows
        ok = (pos < n)[:, None] & col_ok[None, :]
        offs = pid_b * stride_b + pos[:, None] * stride_n + cols[None, :]
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # the log-decays broadcast through zero strides; padding is the identity map (log
        # decay 0, input 0), so it passes the carry through
        a_offs = pid_b * a_sb + pos[:, None] * a_sn + cols[None, :] * a_sr
        log_a = tl.load(log_a_ptr + a_offs, mask=ok, other=0.0).to(tl.float32)
        total, s = tl.associative_scan((log_a, u), 0, _affine, reverse=REVERSE)
        s = s + tl.exp(total) * carry[None, :]
        tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=ok)
        edge = 0 if REVERSE else BLOCK_N - 1
        carry = tl.sum(tl.where((rows == edge)[:, None], s, 0.0), axis=0)


def _strides(decay: torch.Tensor, bsz: int, n: int, r: int) -> tuple[int, int, int]:
    """(batch, step, channel) strides of the decays: (R,) per channel, (B, N) per step or
    (B, N, R) per step and channel."""
    if decay.dim() == 1:
        return 0, 0, 1
    if decay.shape == (bsz, n):
        return decay.stride(0), decay.stride(1), 0
    if decay.shape == (bsz, n, r):
        return decay.stride(0), decay.stride(1), decay.stride(2)
    raise ValueError(f"decays must be (R,), (B, N) or (B, N, R) with (B, N, R) = ({bsz}, {n}, "
                     f"{r}), got {tuple(decay.shape)}")


# a custom op: torch.compile keeps the launch as one opaque node instead of tracing into
# Triton, so a compiled step stays one graph
@torch.library.custom_op("muse::decayed_scan", mutates_args=())
def linear_scan(u: torch.Tensor, log_decay: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """u (B, N, R), log a (R,), (B, N) or (B, N, R) → s (B, N, R) with s_t = a_t s_{t−1} + u_t
    (reverse: s_t = a_t s_{t+1} + u_t)."""
    u = u.contiguous()
    bsz, n, r = u.shape
    log_a = log_decay.float().contiguous()
    s = torch.empty_like(u)
    block_r = BLOCK_R if r > 256 else 8
    grid = (bsz, triton.cdiv(r, block_r))
    # the tile count comes from the host: Triton 3.6's interpreter cannot loop to a traced bound
    tiles = triton.cdiv(n, BLOCK_N)
    _scan_kernel[grid](u, s, log_a, n, tiles, r, u.stride(0), u.stride(1),
                       *_strides(log_a, bsz, n, r), REVERSE=reverse, BLOCK_N=BLOCK_N,
                       BLOCK_R=block_r)
    return s


@linear_scan.register_fake
def _(u, log_decay, reverse=False):
    return u.new_empty(u.shape)


class LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
        ctx.log_decay_dtype = log_decay.dtype
        log_decay = log_decay.float()
        s = linear_scan(u, log_decay)
        ctx.save_for_backward(s, log_decay)
        return s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_s: torch.Tensor):
        s, log_decay = ctx.saved_tensors
        if log_decay.dim() == 1:
            shifted = log_decay
        else:  # ∂L/∂u_t carries back through a_{t+1}
            shifted = torch.cat((log_decay[:, 1:], torch.zeros_like(log_decay[:, :1])), dim=1)
        grad_u = linear_scan(grad_s.to(s.dtype), shifted, reverse=True)
        grad_log_decay = None
        if ctx.needs_input_grad[1]:
            # Σ ∂L/∂u_t · s_{t−1}, s_{−1} = 0, summed in float64: per channel it runs over
            # B·N terms, too many for a float32 sum to stay accurate (a decay per step and
            # channel sums nothing: float32 is exact enough)
            wide = torch.float32 if log_decay.dim() == 3 else torch.float64
            prod = grad_u[:, 1:].to(wide) * s[:, :-1].to(wide)
            if log_decay.dim() == 1:
                dot = prod.sum(dim=(0, 1))
            elif log_decay.dim() == 2:
                dot = torch.nn.functional.pad(prod.sum(dim=2), (1, 0))
            else:
                dot = torch.nn.functional.pad(prod, (0, 0, 1, 0))
            grad_log_decay = (dot * torch.exp(log_decay.to(wide))).to(ctx.log_decay_dtype)
        return grad_u, grad_log_decay


def decayed_cumsum_triton(u: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """u (B, N, R), log a: (R,) as in `muse.ops.decayed_scan.chunk.decayed_cumsum`, (B, N) one
    decay per step shared by the R channels, or (B, N, R) one per step and channel."""
    return LinearScan.apply(u, log_decay)
