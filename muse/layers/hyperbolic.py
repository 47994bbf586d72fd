"""Causal Poincaré-ball attention inside sliding windows, O(N·w) (DESIGN §3.5).

Queries and keys are tangent vectors at the origin, mapped onto the Poincaré ball of curvature
−c by expmap0(u) = tanh(√c‖u‖) · u / (√c‖u‖). Token t attends to t−w+1 … t with scores
−β_h · d_c(q_t, k_s), where

    d_c(x, y) = arcosh(1 + 2c‖x − y‖² / ((1 − c‖x‖²)(1 − c‖y‖²))) / √c,
    ‖x − y‖² = ‖x‖² + ‖y‖² − 2 x·y,

so every pair needs only the two norms and one dot product: the scores of a block are one
batched matmul plus elementwise work, never a pairwise loop. Values stay Euclidean.

Blocking is the softmax window's (layers.local_attention): queries in blocks of w, block c
against the 2w keys of blocks c−1 and c under one banded mask. Positions are rotary on the
tangent vectors: a rotation commutes with expmap0 and keeps norms and relative dot products,
so the distance depends on positions only through their difference and nothing absolute needs
carrying when streaming (the last w−1 keys and values are carried, as in the softmax window).

For backward the attention is one autograd node (_PoincareWindow): it keeps q, k and the values
once each in their own dtype and the blocks' dot products (bf16 under autocast; formed again
instead with `recompute_dot`), and forms the ball maps, the score chain and the weights again,
where autograd through the ops would keep the ball maps in float32, the 2w-key blocks (each key
and value twice) and the weights: phase7:small 11,602 → 3,744 bytes a token and layer (bf16,
w = 128), 1,696 with `recompute_dot`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.layers.cast import autocast_read
from muse.layers.local_attention import SlidingWindowAttention, _band
from muse.layers.rotary import apply_rotary, rotary_tables

# Tangent norms √c‖u‖ are capped here: the ball radius tanh(6) = 1 − 1.2e-5, and the conformal
# factors cosh²(6) ≈ 4e4 keep float32 distances finite (tanh saturates to 1 near 9 in float32).
MAX_TANGENT_RADIUS = 6.0


def _ball(u: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u (…, d) → (x = expmap0(u), ‖x‖² (…, 1), 1 − c‖x‖² (…, 1)). The last is sech²(√c‖u‖),
    computed as such: 1 − c‖x‖² itself would cancel to 0 as the point nears the boundary."""
    sc = math.sqrt(c)
    norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    r = (sc * norm).clamp_max(MAX_TANGENT_RADIUS)
    # tanh(r)/r → 1 as r → 0; the floor only acts on an exactly zero u (a padding key), x = 0
    scale = torch.tanh(r) / (sc * norm).clamp_min(torch.finfo(u.dtype).tiny)
    scale = torch.where(norm > 0, scale, torch.full_like(scale, 1.0))
    x = u * scale
    return x, x.square().sum(-1, keepdim=True), torch.cosh(r).square().reciprocal()


def expmap0(u: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """The exponential map at the origin of the Poincaré ball of curvature −c."""
    return _ball(u, c)[0]


def _acosh1p(z: torch.Tensor) -> torch.Tensor:
    """arcosh(1 + z) for z ≥ 0, accurate for small z (no 1 + z rounding)."""
    return torch.log1p(z + torch.sqrt(z * (z + 2)))


def _distance(dot, nq, nk, dq, dk, c: float) -> torch.Tensor:
    """d_c from the dot products x_i·y_j (…, n, m) and each side's ‖x‖² and 1 − c‖x‖² (…, n, 1)
    and (…, m, 1) of `_ball`."""
    sq = (nq + nk.transpose(-1, -2) - 2 * dot).clamp_min(0)
    z = 2 * c * sq / (dq * dk.transpose(-1, -2))
    # z = 0 only when the points coincide; the floor keeps arcosh's gradient (∝ 1/√z) finite
    return _acosh1p(z.clamp_min(torch.finfo(z.dtype).eps)) / math.sqrt(c)


def poincare_distance(q: torch.Tensor, k: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """Tangent vectors q (…, n, d), k (…, m, d) → d_c(expmap0 q_i, expmap0 k_j) (…, n, m),
    from norms and one batched dot product."""
    xq, nq, dq = _ball(q, c)
    xk, nk, dk = _ball(k, c)
    return _distance(xq @ xk.transpose(-1, -2), nq, nk, dq, dk, c)


def _weights(dot, nq, nk, dq, dk, beta, mask, c: float, dtype: torch.dtype) -> torch.Tensor:
    """softmax(−β·d_c) over the allowed keys, cast to the values' dtype."""
    scores = (-beta[:, None, None, None] * _distance(dot, nq, nk, dq, dk, c))
    return torch.softmax(scores.masked_fill(~mask, -torch.inf), dim=-1).to(dtype)


def mobius_distance(x: torch.Tensor, y: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """Ball points x (…, n, d), y (…, m, d) → 2/√c · artanh(√c‖(−x) ⊕_c y‖) (…, n, m), by
    Möbius addition over every pair (broadcast, O(n·m·d) memory): the reference definition."""
    x, y = x[..., :, None, :], y[..., None, :, :]
    xy = -(x * y).sum(-1, keepdim=True)  # ⟨−x, y⟩
    nx, ny = x.square().sum(-1, keepdim=True), y.square().sum(-1, keepdim=True)
    num = (1 + 2 * c * xy + c * ny) * (-x) + (1 - c * nx) * y
    den = 1 + 2 * c * xy + c * c * nx * ny
    sc = math.sqrt(c)
    return 2 / sc * torch.atanh(sc * torch.linalg.vector_norm(num / den, dim=-1))


def poincare_attention_reference(q, k, v, window: int, c: float, beta: torch.Tensor):
    """The definition over the full N×N matrix with a band mask, distances by Möbius addition:
    q, k, v (B, H, N, d), beta (H,), no positions added."""
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    scores = -beta[:, None, None] * mobius_distance(expmap0(q, c), expmap0(k, c), c)
    return torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1) @ v


def _autocast_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a matmul of `dtype` operands runs in here: autocast's lower precision where
    autocast is on for the device and casts such operands (float32), else `dtype` itself."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _GivenProduct(torch.autograd.Function):
    """a @ bᵀ whose value was formed before: backward as the matmul's, without forming it
    again (the dot products kept from the forward enter the recomputed score chain here)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return value.view_as(value)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        return grad @ b, grad.transpose(-1, -2) @ a, None


class _Layout:
    """The softmax window's blocking (layers.local_attention) for N queries and P + N keys:
    M blocks of w queries; keys with w slots in front (the P carried ones at their end, zeros
    before) and padding behind, block c seeing the 2w keys of slots c and c + 1."""

    def __init__(self, n: int, window: int, past: int):
        self.n, self.window, self.past = n, window, past
        self.m = -(-n // window)
        self.front, self.back = window - past, self.m * window - n

    def keys(self, t: torch.Tensor) -> torch.Tensor:  # (B, H, (M + 1)·w, ·): slots, padded
        return F.pad(t, (0, 0, self.front, self.back))

    def blocks(self, t: torch.Tensor) -> torch.Tensor:  # (B, H, M, 2w, ·): views of `keys`
        return t.unfold(2, 2 * self.window, self.window).transpose(-1, -2)

    def queries(self, t: torch.Tensor) -> torch.Tensor:  # (B, H, M·w, ·): padded behind
        return F.pad(t, (0, 0, 0, self.back))

    def mask(self, device: torch.device) -> torch.Tensor:  # (M, w, 2w)
        band = _band(self.window, self.past, device)
        return torch.cat((band[:1], band[1:].expand(self.m - 1, -1, -1)))


def _scores(q, k, beta, lay: _Layout, c: float, dot_dtype, w_dtype, dot=None):
    """(softmax weights (B, H, M, w, 2w) in w_dtype, the dot products in dot_dtype) from the
    tangent q (B, H, N, d) and k (B, H, P + N, d): each key mapped onto the ball once, before
    the blocks repeat it. With `dot` given (kept from the forward) the product is not formed
    again; its gradient still reaches both sides (_GivenProduct)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    xk, nk, dk = (lay.blocks(t) for t in _ball(lay.keys(k.to(wide)), c))
    # padded first: a padding query is u = 0, the origin (1 − c‖x‖² = 1, distances finite)
    xq, nq, dq = (t.unflatten(2, (lay.m, lay.window)) for t in _ball(lay.queries(q.to(wide)), c))
    a, b = xq.to(dot_dtype), xk.to(dot_dtype)
    if dot is None:
        dot = a @ b.transpose(-1, -2)  # (B, H, M, w, 2w): one batched matmul per block
    else:
        dot = _GivenProduct.apply(a, b, dot)
    weights = _weights(dot, nq, nk, dq, dk, beta.to(wide), lay.mask(q.device), c, w_dtype)
    return weights, dot


def _window_forward(q, k, v, beta, lay: _Layout, c: float, dot_dtype, y_dtype):
    """(the output (B, H, N, d), the padded values, the dot products), autocast off and its
    dtypes applied by hand."""
    with torch.autocast(q.device.type, enabled=False):
        weights, dot = _scores(q, k, beta, lay, c, dot_dtype, v.dtype)
        vp = lay.keys(v)
        y = weights.to(y_dtype) @ lay.blocks(vp).to(y_dtype)
    bsz, heads, _, d = q.shape
    return y.view(bsz, heads, lay.m * lay.window, d)[:, :, :lay.n], vp, dot


class _PoincareWindow(torch.autograd.Function):
    """The attention from the rotated tangent q, k and the values to the output as one autograd
    node, so backward keeps what it chooses: q and k as given (the ball map, its norms and
    conformal factors are formed again from them: elementwise over N × d), the padded values
    once (not the 2w-key blocks, which repeat each value twice), β, and unless `recompute_dot`
    the dot products x_q·x_k (B, H, M, w, 2w) in the matmul's dtype. The score chain from the
    dot products to the weights (elementwise over w × 2w per query) and the weights are formed
    again in backward; with `recompute_dot` the dot products too
    (one more batched matmul, w × 2w × d per block and head). The body runs with autocast off
    and the autocast dtypes applied by hand, so backward forms exactly what forward did."""

    @staticmethod
    def forward(ctx, q, k, v, beta, lay: _Layout, c: float, dot_dtype, y_dtype,
                recompute_dot: bool):
        out, vp, dot = _window_forward(q, k, v, beta, lay, c, dot_dtype, y_dtype)
        ctx.lay, ctx.c, ctx.dtypes = lay, c, (dot_dtype, y_dtype)
        ctx.save_for_backward(q, k, vp, beta, None if recompute_dot else dot)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        q, k, vp, beta, dot = ctx.saved_tensors
        lay, (dot_dtype, y_dtype) = ctx.lay, ctx.dtypes
        need_q, need_k, need_v, need_beta = ctx.needs_input_grad[:4]
        leaves = [t.detach().requires_grad_(need)
                  for t, need in ((q, need_q), (k, need_k), (beta, need_beta))]
        wanted = [t for t in leaves if t.requires_grad]
        with torch.autocast(q.device.type, enabled=False), torch.enable_grad():
            weights, _ = _scores(*leaves, lay, ctx.c, dot_dtype, vp.dtype, dot)
            w_mm, v_mm = weights.detach().to(y_dtype), lay.blocks(vp).to(y_dtype)
            gy = lay.queries(grad_y.to(y_dtype)).unflatten(2, (lay.m, lay.window))
            grads = [None] * 3
            if wanted:
                grad_w = (gy @ v_mm.transpose(-1, -2)).to(weights.dtype)
                found = iter(torch.autograd.grad(weights, wanted, grad_w))
                grads = [next(found) if t.requires_grad else None for t in leaves]
        grad_v = None
        if need_v:
            # each padded slot is the second half of block c − 1 and the first of block c
            per_block = (w_mm.transpose(-1, -2) @ gy).to(vp.dtype)  # (B, H, M, 2w, d)
            w = lay.window
            slots = per_block.new_zeros(*vp.shape[:2], lay.m + 1, w, vp.shape[-1])
            slots[:, :, :-1] += per_block[..., :w, :]
            slots[:, :, 1:] += per_block[..., w:, :]
            grad_v = slots.flatten(2, 3)[:, :, lay.front:vp.shape[2] - lay.back]
        grad_q, grad_k, grad_beta = grads
        return grad_q, grad_k, grad_v, grad_beta, None, None, None, None, None


def poincare_local_attention(q, k, v, window: int, c: float, beta: torch.Tensor, past: int = 0,
                             recompute_dot: bool = False):
    """q (B, H, N, d), k and v (B, H, P + N, d): the P ≤ w − 1 tokens just before this segment
    first → (B, H, N, d). beta (H,) > 0. Distances in at least float32 (the dot products in
    the autocast dtype where autocast is on). For backward it keeps q, k, the padded v, β and,
    unless `recompute_dot`, the dot products of each block's queries with its 2w keys (see
    _PoincareWindow); everything else is formed again."""
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    if not 0 <= past < window:
        raise ValueError(f"past must lie in [0, window − 1 = {window - 1}], got {past}")
    lay = _Layout(q.shape[2], window, past)
    wide = torch.promote_types(q.dtype, torch.float32)
    dot_dtype = _autocast_dtype(wide, q.device)
    y_dtype = _autocast_dtype(v.dtype, q.device)
    # under torch.compile inductor picks what to keep, and the node's autograd.grad would
    # split the graph
    if torch.compiler.is_compiling():
        return _window_forward(q, k, v, beta.to(wide), lay, c, dot_dtype, y_dtype)[0]
    return _PoincareWindow.apply(q, k, v, beta.to(wide), lay, c, dot_dtype, y_dtype,
                                 recompute_dot)


class PoincareWindowAttention(SlidingWindowAttention):
    """(B, N, D) → (B, N, D): q, k, v and output projections, rotary positions on the tangent
    q and k, Poincaré-distance scores with a learned β per head. Streams with the window's last
    w − 1 keys and values (before rotation)."""

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, window: int,
                 curvature: float = 1.0, beta_init: float = 1.0, rope_base: float = 10000.0,
                 recompute_dot: bool = False):
        super().__init__(d_model=d_model, n_heads=n_heads, head_dim=head_dim, window=window,
                         rope_base=rope_base)
        if curvature <= 0 or beta_init <= 0:
            raise ValueError(f"curvature and beta_init must be > 0, got {curvature}, {beta_init}")
        self.curvature = curvature
        self.recompute_dot = recompute_dot  # see poincare_local_attention
        # β = softplus(·) > 0: a larger β sharpens attention towards the nearest keys
        self.beta_logit = nn.Parameter(torch.full((n_heads,), math.log(math.expm1(beta_init))))

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, head_dim={self.head_dim}, window={self.window}, "
                f"curvature={self.curvature}")

    def beta(self) -> torch.Tensor:
        return F.softplus(self.beta_logit)

    def forward(self, x: torch.Tensor, state: dict | None = None):
        bsz, n, _ = x.shape
        qkv = self.qkv(autocast_read(x))  # the autocast copy its block's other readers share
        q, k, v = qkv.view(bsz, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = 0 if state is None else state["k"].shape[2]
        if p:
            k = torch.cat((state["k"].to(k.dtype), k), 2)
            v = torch.cat((state["v"].to(v.dtype), v), 2)
        # positions counted from the first carried key: only their differences enter
        cos, sin = rotary_tables(k.shape[2], self.head_dim, self.rope_base, x.device, q.dtype)
        qr, kr = apply_rotary(q, cos[p:], sin[p:]), apply_rotary(k, cos, sin)
        y = poincare_local_attention(qr, kr, v, self.window, self.curvature, self.beta(), past=p,
                                     recompute_dot=self.recompute_dot)
        y = self.out(y.transpose(1, 2).reshape(bsz, n, -1))
        if state is None:
            return y
        start = k.shape[2] - min(self.window - 1, k.shape[2])
        return y, {"k": k[:, :, start:], "v": v[:, :, start:]}
