"""s_t = λ ⊙ s_{t−1} + u_t on the GPU: one Triton launch forward, one backward.

The chunked matrix form (`muse.ops.decayed_cumsum`) is exact and fast on paper, but at batch 1
it is ~40 small PyTorch ops per call, and on the lent H200 a training step of phase1:10gb spent
most of the AR-SSM's time launching them (9 ms of span for 1 ms of kernels at seq 4096). Here
one program owns a block of channels and walks the sequence in tiles: inside a tile an
associative scan of the affine maps s ↦ λs + u, across tiles the carried state. Accumulation
in fp32 whatever the input dtype.

Backward: with ḡ = ∂L/∂s, ∂L/∂u_t = Σ_{j≥t} λ^{j−t} ḡ_j — the same recurrence run from the end —
and ∂L/∂λ = Σ_t (∂L/∂u_t) · s_{t−1}, so ∂L/∂log λ = λ · that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # positions per tile
BLOCK_R = 32  # channels per program


@triton.jit
def _affine(a1, b1, a2, b2):
    # s ↦ a1 s + b1, then s ↦ a2 s + b2
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _scan_kernel(u_ptr, s_ptr, decay_ptr, n, r, stride_b, stride_n,
                 REVERSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < r
    lam = tl.load(decay_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
    rows = tl.arange(0, BLOCK_N)
    carry = tl.zeros((BLOCK_R,), dtype=tl.float32)
    tiles = tl.cdiv(n, BLOCK_N)
    for i in range(0, tiles):
        tile = tiles - 1 - i if REVERSE else i
        pos = tile * BLOCK_N + rows
        ok = (pos < n)[:, None] & col_ok[None, :]
        offs = pid_b * stride_b + pos[:, None] * stride_n + cols[None, :]
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # padding is the identity map (decay 1, input 0), so it passes the carry through
        a = tl.where(ok, lam[None, :], 1.0)
        prod, s = tl.associative_scan((a, u), 0, _affine, reverse=REVERSE)
        s = s + prod * carry[None, :]
        tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=ok)
        edge = 0 if REVERSE else BLOCK_N - 1
        carry = tl.sum(tl.where((rows == edge)[:, None], s, 0.0), axis=0)


def decayed_scan(u: torch.Tensor, decay: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """u (B, N, R) → s (B, N, R), s_t = λ s_{t−1} + u_t (reverse: s_t = λ s_{t+1} + u_t)."""
    u = u.contiguous()
    bsz, n, r = u.shape
    s = torch.empty_like(u)
    grid = (bsz, triton.cdiv(r, BLOCK_R))
    _scan_kernel[grid](u, s, decay.float().contiguous(), n, r, u.stride(0), u.stride(1),
                       REVERSE=reverse, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R)
    return s


class DecayedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
        decay = torch.exp(log_decay.float())
        s = decayed_scan(u, decay)
        ctx.save_for_backward(s, decay)
        ctx.log_decay_dtype = log_decay.dtype
        return s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_s: torch.Tensor):
        s, decay = ctx.saved_tensors
        grad_u = decayed_scan(grad_s.to(s.dtype), decay, reverse=True)
        grad_log_decay = None
        if ctx.needs_input_grad[1]:
            # Σ_t ∂L/∂u_t · s_{t−1}, s_{−1} = 0
            dot = (grad_u[:, 1:].float() * s[:, :-1].float()).sum(dim=(0, 1))
            grad_log_decay = (dot * decay).to(ctx.log_decay_dtype)
        return grad_u, grad_log_decay


def decayed_cumsum_triton(u: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """The contract of `muse.ops.decayed_cumsum.decayed_cumsum` (u (B, N, R), log λ (R,))."""
    return DecayedScan.apply(u, log_decay)
