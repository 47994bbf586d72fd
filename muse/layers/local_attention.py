"""Causal sliding-window softmax attention in O(N·w): token t attends to t−w+1 … t.

Queries go in blocks of w; block c attends to the 2w keys of blocks c−1 and c through one
banded mask, so one batched SDPA call does all blocks (the memory-efficient kernel on CUDA).
The local window gives a recurrent model exact short-range copying, the part of language
modelling a fixed-size state does worst (Based, Samba, Griffin; QUALITY.md item 7).
Streaming: the keys and values of the last w−1 tokens are carried in, so segments run one after
another equal one run over them all. Positions are rotary, counted from the first carried
key, so only position differences enter and nothing absolute needs carrying.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.layers.rotary import apply_rotary, rotary_tables


def local_attention_naive(q, k, v, window: int):
    """The definition, with the N×N scores: q, k, v (B, H, N, D), no positions added."""
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1) @ v


@functools.lru_cache(maxsize=32)
def _band(window: int, past: int, device: torch.device) -> torch.Tensor:
    """(2, w, 2w) masks: [0] for the first block (keys before the carried ones are padding),
    [1] for every other block. Key s of block c sits at c·w + s and query r at w + c·w + r
    (coordinates with w slots in front): allowed when r < s ≤ w + r."""
    # a plain tensor even when first asked for under inference_mode: training reuses it
    with torch.inference_mode(False):
        r = torch.arange(window, device=device)[:, None]
        s = torch.arange(2 * window, device=device)[None, :]
        band = (s > r) & (s <= window + r)
        first = band & (s >= window - past)
        return torch.stack((first, band))


def _pairs(blocks: torch.Tensor) -> torch.Tensor:
    """(B, H, M + 1, w, D) → (B, H, M, 2w, D): blocks c and c + 1 side by side."""
    return torch.cat((blocks[:, :, :-1], blocks[:, :, 1:]), dim=3)


def local_attention(q, k, v, window: int, past: int = 0):
    """q (B, H, N, D), k and v (B, H, P + N, D): the P ≤ w − 1 tokens just before this segment
    first, then the segment's own → (B, H, N, D). No positions are added here."""
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    if past >= window:
        raise ValueError(f"at most window − 1 = {window - 1} past tokens, got {past}")
    bsz, heads, n, d = q.shape
    m = -(-n // window)
    # w slots in front (the carried keys at their end, zeros before), padding behind to M·w + w
    front, back = window - past, m * window - n
    # each block's 2w keys as two neighbouring blocks side by side: the same values as
    # unfold(2, 2w, w), whose overlapping backward torch.compile's inductor gets wrong
    # (pytorch #172064)
    kp, vp = (_pairs(F.pad(t, (0, 0, front, back)).view(bsz, heads, m + 1, window, d))
              for t in (k, v))
    qp = F.pad(q, (0, 0, 0, back)).view(bsz, heads, m, window, d)
    band = _band(window, past, q.device)
    mask = torch.cat((band[:1], band[1:].expand(m - 1, -1, -1)))  # (M, w, 2w)
    flat = (bsz * heads, m)
    y = F.scaled_dot_product_attention(
        qp.reshape(*flat, window, d), kp.reshape(*flat, 2 * window, d),
        vp.reshape(*flat, 2 * window, d), attn_mask=mask,
    )
    return y.reshape(bsz, heads, m * window, d)[:, :, :n]


def rotary_local_attention(q, k, v, window: int, base: float, past=None):
    """Rotary positions on q and k, then `local_attention`. `past` is (keys, values) of the
    carried tokens before rotation (or None); returns (y, the next past, w − 1 tokens at most)."""
    past_k, past_v = past if past is not None else (None, None)
    p = 0 if past_k is None else past_k.shape[2]
    if p:
        k_all, v_all = torch.cat((past_k.to(k.dtype), k), 2), torch.cat((past_v.to(v.dtype), v), 2)
    else:
        k_all, v_all = k, v
    cos, sin = rotary_tables(k_all.shape[2], q.shape[-1], base, q.device, q.dtype)
    qr, kr = apply_rotary(q, cos[p:], sin[p:]), apply_rotary(k_all, cos, sin)
    y = local_attention(qr, kr, v_all, window, past=p)
    keep = min(window - 1, k_all.shape[2])
    start = k_all.shape[2] - keep
    return y, (k_all[:, :, start:], v_all[:, :, start:])


def empty_kv(batch: int, n_heads: int, head_dim: int, ref: torch.Tensor, device=None,
             dtype=None) -> dict:
    """The key/value cache before any token: {"k", "v"}, each (B, H, 0, D_h), on `ref`'s device
    and dtype unless told otherwise."""
    empty = torch.zeros(batch, n_heads, 0, head_dim, device=device or ref.device,
                        dtype=dtype or ref.dtype)
    return {"k": empty, "v": empty.clone()}


class SlidingWindowAttention(nn.Module):
    """(B, N, D) → (B, N, D): its own q, k, v and output projections, rotary positions,
    `rotary_local_attention` per head. Streams with the window's keys and values."""

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, window: int,
                 rope_base: float = 10000.0):
        super().__init__()
        if window < 1 or head_dim % 2:
            raise ValueError(f"need window ≥ 1 and an even head_dim, got {window}, {head_dim}")
        self.n_heads, self.head_dim, self.window, self.rope_base = (
            n_heads, head_dim, window, rope_base)
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        return empty_kv(batch, self.n_heads, self.head_dim, self.qkv.weight, device, dtype)

    def forward(self, x: torch.Tensor, state: dict | None = None):
        bsz, n, _ = x.shape
        q, k, v = self.qkv(x).view(bsz, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = None if state is None else (state["k"], state["v"])
        y, past = rotary_local_attention(q, k, v, self.window, self.rope_base, past)
        y = self.out(y.transpose(1, 2).reshape(bsz, n, -1))
        return y if state is None else (y, {"k": past[0], "v": past[1]})
