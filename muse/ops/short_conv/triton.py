"""The short causal depthwise conv (+ SiLU) in one Triton launch forward and one (or two)
backward, on the unpadded (B, N, C) input: the K taps before the first token read as zeros in
the kernel, so no padded copy exists. A program owns a (BT × BC) tile of tokens × channels and
sums its K taps in float32 (float64 for float64 inputs).

Backward keeps only the input: a = Σ_j w_j x_{t−K+1+j} is formed again, g_t = dy_t · SiLU′(a_t),
∂x_τ = Σ_s w_{K−1−s} g_{τ+s} (the program forms g on its tile shifted by s = 0…K−1, K² tap
reads served from cache; or, with BACKWARD "split", g kept from one launch and spread to ∂x
by a second) and ∂w_j = Σ_t g_t x_{t−K+1+j} as per-tile partial sums, added up after the
launch in a fixed order (no atomics: the same gradient every run)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T, BLOCK_C = 32, 128
FORWARD_WARPS = BACKWARD_WARPS = 4  # each launch's config is read when it runs
# the backward in one launch ("fused": each program forms g on its tile shifted K ways, K² tap
# reads and K exponentials an element) or two ("split": g formed once and kept in float32, then
# spread to ∂x): split trades that recompute for one float32 write and read of g
BACKWARD = "split"


@triton.jit
def _tile(pid_t, pid_c, n, c, BT: tl.constexpr, BC: tl.constexpr):
    tiles = tl.cdiv(n, BT)
    seq = (pid_t // tiles).to(tl.int64)
    rows = (pid_t % tiles) * BT + tl.arange(0, BT)
    cols = pid_c * BC + tl.arange(0, BC)
    return seq * n * c, rows, cols, cols < c


@triton.jit
def _pre(x_ptr, w_ptr, base, rows, cols, cmask, n, c, K: tl.constexpr, BT: tl.constexpr,
         BC: tl.constexpr, DTYPE: tl.constexpr):
    # a_t = Σ_j w_j x_{t−K+1+j} on the given rows; taps outside [0, n) read as zeros
    acc = tl.zeros((BT, BC), DTYPE)
    for j in tl.static_range(K):
        src = rows - (K - 1) + j
        mask = ((src >= 0) & (src < n))[:, None] & cmask[None, :]
        xj = tl.load(x_ptr + base + src[:, None] * c + cols[None, :], mask=mask, other=0.0)
        wj = tl.load(w_ptr + cols * K + j, mask=cmask, other=0.0)
        acc += xj.to(DTYPE) * wj.to(DTYPE)[None, :]
    return acc


@triton.jit
def _forward_conv(x_ptr, w_ptr, y_ptr, n, c, K: tl.constexpr, BT: tl.constexpr,
                  BC: tl.constexpr, ACTIVATION: tl.constexpr, WIDE: tl.constexpr):
    DTYPE: tl.constexpr = tl.float64 if WIDE else tl.float32
    base, rows, cols, cmask = _tile(tl.program_id(0), tl.program_id(1), n, c, BT, BC)
    a = _pre(x_ptr, w_ptr, base, rows, cols, cmask, n, c, K, BT, BC, DTYPE)
    if ACTIVATION:
        a = a / (1.0 + tl.exp(-a))
    mask = (rows < n)[:, None] & cmask[None, :]
    tl.store(y_ptr + base + rows[:, None] * c + cols[None, :], a.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _gate_grad(x_ptr, w_ptr, dy_ptr, base, rows, cols, cmask, n, c, K: tl.constexpr,
               BT: tl.constexpr, BC: tl.constexpr, ACTIVATION: tl.constexpr,
               DTYPE: tl.constexpr):
    # g_t = dy_t · SiLU′(a_t) on the given rows (0 past the end)
    mask = (rows < n)[:, None] & cmask[None, :]
    g = tl.load(dy_ptr + base + rows[:, None] * c + cols[None, :], mask=mask, other=0.0)
    g = g.to(DTYPE)
    if ACTIVATION:
        a = _pre(x_ptr, w_ptr, base, rows, cols, cmask, n, c, K, BT, BC, DTYPE)
        sig = 1.0 / (1.0 + tl.exp(-a))
        g = g * sig * (1.0 + a * (1.0 - sig))
    return g


@triton.jit
def _weight_partials(x_ptr, dw_ptr, g, pid_t, base, rows, cols, cmask, n, c, K: tl.constexpr,
                     DTYPE: tl.constexpr):
    # ∂w_j from this tile's own rows: a partial sum per tile, (tiles, C, K)
    for j in tl.static_range(K):
        src = rows - (K - 1) + j
        mask = ((src >= 0) & (src < n))[:, None] & cmask[None, :]
        xj = tl.load(x_ptr + base + src[:, None] * c + cols[None, :], mask=mask, other=0.0)
        tl.store(dw_ptr + (pid_t.to(tl.int64) * c + cols) * K + j,
                 tl.sum(g * xj.to(DTYPE), axis=0), mask=cmask)


@triton.jit
def _own_rows(x_ptr, w_ptr, dy_ptr, dw_ptr, n, c, K: tl.constexpr, BT: tl.constexpr,
              BC: tl.constexpr, ACTIVATION: tl.constexpr, DTYPE: tl.constexpr):
    # g on the program's own tile and ∂w's partials from it; the tile's offsets for the rest
    pid_t = tl.program_id(0)
    base, rows, cols, cmask = _tile(pid_t, tl.program_id(1), n, c, BT, BC)
    g = _gate_grad(x_ptr, w_ptr, dy_ptr, base, rows, cols, cmask, n, c, K, BT, BC, ACTIVATION,
                   DTYPE)
    _weight_partials(x_ptr, dw_ptr, g, pid_t, base, rows, cols, cmask, n, c, K, DTYPE)
    return g, base, rows, cols, cmask


@triton.jit
def _backward_conv(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_ptr, n, c, K: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, ACTIVATION: tl.constexpr,
                   WIDE: tl.constexpr):
    DTYPE: tl.constexpr = tl.float64 if WIDE else tl.float32
    g, base, rows, cols, cmask = _own_rows(x_ptr, w_ptr, dy_ptr, dw_ptr, n, c, K, BT, BC,
                                           ACTIVATION, DTYPE)
    dx = g * tl.load(w_ptr + cols * K + K - 1, mask=cmask, other=0.0).to(DTYPE)[None, :]
    for s in tl.static_range(1, K):  # token τ reaches a_{τ+s} through tap K−1−s
        gs = _gate_grad(x_ptr, w_ptr, dy_ptr, base, rows + s, cols, cmask, n, c, K, BT, BC,
                        ACTIVATION, DTYPE)
        ws = tl.load(w_ptr + cols * K + K - 1 - s, mask=cmask, other=0.0).to(DTYPE)
        dx += gs * ws[None, :]
    mask = (rows < n)[:, None] & cmask[None, :]
    tl.store(dx_ptr + base + rows[:, None] * c + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _gate_conv(x_ptr, w_ptr, dy_ptr, g_ptr, dw_ptr, n, c, K: tl.constexpr, BT: tl.constexpr,
               BC: tl.constexpr, ACTIVATION: tl.constexpr, WIDE: tl.constexpr):
    # the split backward's first launch: g on the tile's own rows, kept, and ∂w's partials
    DTYPE: tl.constexpr = tl.float64 if WIDE else tl.float32
    g, base, rows, cols, cmask = _own_rows(x_ptr, w_ptr, dy_ptr, dw_ptr, n, c, K, BT, BC,
                                           ACTIVATION, DTYPE)
    mask = (rows < n)[:, None] & cmask[None, :]
    tl.store(g_ptr + base + rows[:, None] * c + cols[None, :], g, mask=mask)


@triton.jit
def _spread_conv(g_ptr, w_ptr, dx_ptr, n, c, K: tl.constexpr, BT: tl.constexpr,
                 BC: tl.constexpr, WIDE: tl.constexpr):
    # the second: ∂x_τ = Σ_s w_{K−1−s} g_{τ+s} from the kept g
    DTYPE: tl.constexpr = tl.float64 if WIDE else tl.float32
    base, rows, cols, cmask = _tile(tl.program_id(0), tl.program_id(1), n, c, BT, BC)
    dx = tl.zeros((BT, BC), DTYPE)
    for s in tl.static_range(K):
        mask = (rows + s < n)[:, None] & cmask[None, :]
        gs = tl.load(g_ptr + base + (rows + s)[:, None] * c + cols[None, :], mask=mask,
                     other=0.0)
        ws = tl.load(w_ptr + cols * K + K - 1 - s, mask=cmask, other=0.0).to(DTYPE)
        dx += gs * ws[None, :]
    mask = (rows < n)[:, None] & cmask[None, :]
    tl.store(dx_ptr + base + rows[:, None] * c + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask)


def fits(x: torch.Tensor) -> bool:
    """Whether one sequence's offsets (row × C + column) stay in int32, as the kernels take them."""
    return x.shape[1] * x.shape[2] < 2**31


def _grid(x: torch.Tensor):
    bsz, n, c = x.shape
    return bsz * triton.cdiv(n, BLOCK_T), triton.cdiv(c, BLOCK_C)


def _wide(x: torch.Tensor, w: torch.Tensor) -> bool:
    return torch.float64 in (x.dtype, w.dtype)


# custom ops: torch.compile keeps each launch as one opaque node, so a compiled step stays one
# graph
@torch.library.custom_op("muse::short_conv_forward", mutates_args=())
def _forward(x: torch.Tensor, w: torch.Tensor, activation: bool) -> torch.Tensor:
    """x (B, N, C) and w (C, K), both contiguous → y (B, N, C) in x's dtype."""
    y = torch.empty_like(x)
    _forward_conv[_grid(x)](x, w, y, x.shape[1], x.shape[2], K=w.shape[1], BT=BLOCK_T,
                            BC=BLOCK_C, ACTIVATION=activation, WIDE=_wide(x, w),
                            num_warps=FORWARD_WARPS)
    return y


@_forward.register_fake
def _(x, w, activation):
    return x.new_empty(x.shape)


@torch.library.custom_op("muse::short_conv_backward", mutates_args=())
def _backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
              activation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """→ ∂x in x's dtype, ∂w in w's."""
    grid = _grid(x)
    wide = _wide(x, w)
    dx = torch.empty_like(x)
    partial = x.new_empty(grid[0], x.shape[2], w.shape[1],
                          dtype=torch.float64 if wide else torch.float32)
    shape = dict(K=w.shape[1], BT=BLOCK_T, BC=BLOCK_C)
    if BACKWARD == "fused":
        _backward_conv[grid](x, w, dy, dx, partial, x.shape[1], x.shape[2], **shape,
                             ACTIVATION=activation, WIDE=wide, num_warps=BACKWARD_WARPS)
    else:
        g = torch.empty_like(x, dtype=partial.dtype)
        _gate_conv[grid](x, w, dy, g, partial, x.shape[1], x.shape[2], **shape,
                         ACTIVATION=activation, WIDE=wide, num_warps=BACKWARD_WARPS)
        _spread_conv[grid](g, w, dx, x.shape[1], x.shape[2], **shape, WIDE=wide,
                           num_warps=BACKWARD_WARPS)
    return dx, partial.sum(0).to(w.dtype)


@_backward.register_fake
def _(dy, x, w, activation):
    return x.new_empty(x.shape), w.new_empty(w.shape)


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, activation):
        x, w = x.contiguous(), w.contiguous()
        ctx.save_for_backward(x, w)
        ctx.activation = activation
        return _forward(x, w, activation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx, dw = _backward(dy.contiguous(), x, w, ctx.activation)
        return dx, dw, None


def short_conv_triton(x: torch.Tensor, weight: torch.Tensor,
                      activation: bool = True) -> torch.Tensor:
    """y_t = SiLU(Σ_{i<K} w_{K−1−i} ⊙ x_{t−i}) (no SiLU without `activation`), zeros before the
    first token: x (B, N, C) in any float dtype, `weight` a depthwise Conv1d weight (C, 1, K) or
    (C, K); y in x's dtype, ∂weight in weight's. On CUDA or under TRITON_INTERPRET=1."""
    if x.dim() != 3:
        raise ValueError(f"short_conv_triton needs x (B, N, C), got shape {tuple(x.shape)}")
    if not fits(x):
        raise ValueError(f"short_conv_triton indexes a sequence's N × C = {x.shape[1]} × "
                         f"{x.shape[2]} entries in int32: at most 2**31 − 1")
    w = weight.reshape(weight.shape[0], weight.shape[-1])
    if w.shape[0] != x.shape[2] or (weight.dim() == 3 and weight.shape[1] != 1):
        raise ValueError(f"a depthwise weight for {x.shape[2]} channels is ({x.shape[2]}, 1, K), "
                         f"got {tuple(weight.shape)}")
    return _ShortConv.apply(x, w, activation)
