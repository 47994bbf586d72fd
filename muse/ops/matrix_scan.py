"""W_c = A_c W_{c−1} + P_c over chunks c (A_c: Dk × Dk, W and P: Dk × Dv) in one Triton launch:
the delta rule's chunk-to-chunk state steps (muse.ops.delta_rule), which otherwise cost a launch
a chunk from the host, 1,024 of them a layer at 65,536 tokens.

One program owns one sequence-head and a block of W's columns (the columns never mix) and walks
the chunks with W in registers, storing the W each step starts from. Backward is the same walk
from the end: the gradient reaching W before step c is A_cᵀ (that after it) plus the read-out's,
so the kernel runs with A transposed and the read-out's gradient as P.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 32  # W's columns a program: Dv = 64 gives two programs a sequence-head
DK_SIZES = (16, 32, 64, 128)  # the powers of two tl.dot takes for A's side


@triton.jit
def _matrix_scan_kernel(a_ptr, p_ptr, w0_ptr, before_ptr, last_ptr, m, dv,
                        DK: tl.constexpr, BLOCK_V: tl.constexpr, REVERSE: tl.constexpr,
                        TRANSPOSE: tl.constexpr):
    seq = tl.program_id(0)
    rows = tl.arange(0, DK)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = (rows[:, None] < DK) & (cols[None, :] < dv)
    tile = rows[:, None] * dv + cols[None, :]
    if TRANSPOSE:
        a_tile = rows[None, :] * DK + rows[:, None]
    else:
        a_tile = rows[:, None] * DK + rows[None, :]
    w = tl.load(w0_ptr + seq * DK * dv + tile, mask=ok, other=0.0).to(tl.float32)
    for i in range(0, m):
        if REVERSE:
            c = m - 1 - i
        else:
            c = i
        chunk = seq * m + c
        tl.store(before_ptr + chunk * DK * dv + tile, w, mask=ok)
        a = tl.load(a_ptr + chunk * DK * DK + a_tile).to(tl.float32)
        p = tl.load(p_ptr + chunk * DK * dv + tile, mask=ok, other=0.0).to(tl.float32)
        # IEEE float32 products: the loop it replaces multiplies without TF32
        w = tl.dot(a, w, input_precision="ieee") + p
    tl.store(last_ptr + seq * DK * dv + tile, w, mask=ok)


def matrix_scan(a: torch.Tensor, p: torch.Tensor, w0: torch.Tensor, reverse: bool = False,
                transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A (S, M, Dk, Dk), P (S, M, Dk, Dv), W₀ (S, Dk, Dv) → (the W each step starts from
    (S, M, Dk, Dv), the W after the last step (S, Dk, Dv)), float32. `reverse` walks the chunks
    from the end; `transpose` uses A_cᵀ."""
    seqs, m, dk, dv = p.shape
    if a.shape != (seqs, m, dk, dk) or w0.shape != (seqs, dk, dv):
        raise ValueError(f"matrix_scan needs A (S, M, Dk, Dk), P (S, M, Dk, Dv) and W₀ (S, Dk, "
                         f"Dv), got {tuple(a.shape)}, {tuple(p.shape)}, {tuple(w0.shape)}")
    a, p, w0 = (t.contiguous() for t in (a, p, w0))
    before = torch.empty(seqs, m, dk, dv, device=p.device, dtype=torch.float32)
    last = torch.empty(seqs, dk, dv, device=p.device, dtype=torch.float32)
    grid = (seqs, triton.cdiv(dv, BLOCK_V))
    _matrix_scan_kernel[grid](a, p, w0, before, last, m, dv, DK=dk, BLOCK_V=BLOCK_V,
                              REVERSE=reverse, TRANSPOSE=transpose)
    return before, last
