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
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def poincare_local_attention(q, k, v, window: int, c: float, beta: torch.Tensor, past: int = 0):
    """q (B, H, N, d), k and v (B, H, P + N, d): the P ≤ w − 1 tokens just before this segment
    first → (B, H, N, d). beta (H,) > 0. Distances in at least float32."""
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    if not 0 <= past < window:
        raise ValueError(f"past must lie in [0, window − 1 = {window - 1}], got {past}")
    bsz, heads, n, d = q.shape
    m = -(-n // window)
    wide = torch.promote_types(q.dtype, torch.float32)
    front, back = window - past, m * window - n

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (B, H, M, 2w, ·): block c's 2w keys
        return t.unfold(2, 2 * window, window).transpose(-1, -2)

    # the softmax window's layout: w slots in front (carried keys at their end, zeros before);
    # each key is mapped onto the ball once, before the blocks repeat it
    xk, nk, dk = (blocks(t) for t in _ball(F.pad(k.to(wide), (0, 0, front, back)), c))
    vp = blocks(F.pad(v, (0, 0, front, back)))
    xq, nq, dq = (t.view(bsz, heads, m, window, -1)
                  for t in _ball(F.pad(q.to(wide), (0, 0, 0, back)), c))
    dot = xq @ xk.transpose(-1, -2)  # (B, H, M, w, 2w): one batched matmul per block
    band = _band(window, past, q.device)
    mask = torch.cat((band[:1], band[1:].expand(m - 1, -1, -1)))  # (M, w, 2w)
    args = (dot, nq, nk, dq, dk, beta.to(wide), mask, c, v.dtype)
    if torch.is_grad_enabled():
        # the elementwise chain from dot products to weights is formed again in backward:
        # kept, each of its steps would hold a float32 (w × 2w) tensor per block and head
        weights = checkpoint(_weights, *args, use_reentrant=False)
    else:
        weights = _weights(*args)
    y = weights @ vp
    return y.reshape(bsz, heads, m * window, d)[:, :, :n]


class PoincareWindowAttention(SlidingWindowAttention):
    """(B, N, D) → (B, N, D): q, k, v and output projections, rotary positions on the tangent
    q and k, Poincaré-distance scores with a learned β per head. Streams with the window's last
    w − 1 keys and values (before rotation)."""

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, window: int,
                 curvature: float = 1.0, beta_init: float = 1.0, rope_base: float = 10000.0):
        super().__init__(d_model=d_model, n_heads=n_heads, head_dim=head_dim, window=window,
                         rope_base=rope_base)
        if curvature <= 0 or beta_init <= 0:
            raise ValueError(f"curvature and beta_init must be > 0, got {curvature}, {beta_init}")
        self.curvature = curvature
        # β = softplus(·) > 0: a larger β sharpens attention towards the nearest keys
        self.beta_logit = nn.Parameter(torch.full((n_heads,), math.log(math.expm1(beta_init))))

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, head_dim={self.head_dim}, window={self.window}, "
                f"curvature={self.curvature}")

    def beta(self) -> torch.Tensor:
        return F.softplus(self.beta_logit)

    def forward(self, x: torch.Tensor, state: dict | None = None):
        bsz, n, _ = x.shape
        q, k, v = self.qkv(x).view(bsz, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = 0 if state is None else state["k"].shape[2]
        if p:
            k = torch.cat((state["k"].to(k.dtype), k), 2)
            v = torch.cat((state["v"].to(v.dtype), v), 2)
        # positions counted from the first carried key: only their differences enter
        cos, sin = rotary_tables(k.shape[2], self.head_dim, self.rope_base, x.device, q.dtype)
        qr, kr = apply_rotary(q, cos[p:], sin[p:]), apply_rotary(k, cos, sin)
        y = poincare_local_attention(qr, kr, v, self.window, self.curvature, self.beta(), past=p)
        y = self.out(y.transpose(1, 2).reshape(bsz, n, -1))
        if state is None:
            return y
        start = k.shape[2] - min(self.window - 1, k.shape[2])
        return y, {"k": k[:, :, start:], "v": v[:, :, start:]}
