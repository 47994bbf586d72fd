"""W_c = A_c W_{c−1} + P_c over chunks c = 1…M (A_c: Dk × Dk; W, P: Dk × Dv), batched over
sequences: the delta rule's chunk-to-chunk state steps (muse.ops.delta_rule).

Two levels, so the sequential part is about 2√M batched products instead of M:
- inside each group of g chunks, every group at once: the walk from W = 0 and the running
  product C_j = A_j ⋯ A_1 (one product of A_j with [W | C] a step);
- across the groups, one step a group: W entering group k+1 = C_g(k) W + W_g(k);
- the state entering each chunk is then C_{j−1}(k) W_k + W_{j−1}(k), one batched product.
The same sums in another order: the loop's values up to rounding. It does about 3× the loop's
multiply-adds, so it pays where launches cost more than arithmetic (CUDA at small batch);
`sequential_walk` is the loop itself.
"""

from __future__ import annotations

import math

import torch


def affine_walk(step: torch.Tensor, push: torch.Tensor, w: torch.Tensor, reverse: bool = False,
                group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """step (S, M, Dk, Dk), push (S, M, Dk, Dv), w the state before the first step (S, Dk, Dv)
    → (the state each step starts from (S, M, Dk, Dv), the state after the last (S, Dk, Dv)).
    `reverse` walks from chunk M down to 1; `group` is g (default ⌈√M⌉)."""
    seqs, m, dk, dv = push.shape
    if step.shape != (seqs, m, dk, dk) or w.shape != (seqs, dk, dv):
        raise ValueError(f"affine_walk needs step (S, M, Dk, Dk), push (S, M, Dk, Dv) and w "
                         f"(S, Dk, Dv), got {tuple(step.shape)}, {tuple(push.shape)}, "
                         f"{tuple(w.shape)}")
    if reverse:
        entering, last = affine_walk(step.flip(1), push.flip(1), w, group=group)
        return entering.flip(1), last
    g = math.isqrt(max(m - 1, 0)) + 1 if group is None else group
    if g < 1:
        raise ValueError(f"group must be ≥ 1, got {g}")
    groups = -(-m // g)
    pad = groups * g - m
    if pad:  # identity steps with nothing pushed: they leave the state as it is
        eye = torch.eye(dk, dtype=step.dtype, device=step.device).expand(seqs, pad, dk, dk)
        step = torch.cat((step, eye), dim=1)
        push = torch.cat((push, push.new_zeros(seqs, pad, dk, dv)), dim=1)
    step = step.reshape(seqs * groups, g, dk, dk)
    # [P | 0], so that a step of [W | C] is one multiply-add
    push = torch.cat((push, push.new_zeros(seqs, groups * g, dk, dk)), dim=-1)
    push = push.view(seqs * groups, g, dk, dv + dk)
    local = torch.cat((push.new_zeros(seqs * groups, dk, dv),
                       torch.eye(dk, dtype=step.dtype, device=step.device)
                       .expand(seqs * groups, dk, dk)), dim=-1)  # [W | C] from [0 | I]
    starts = []
    for j in range(g):
        starts.append(local)
        local = torch.baddbmm(push[:, j], step[:, j], local)
    starts = torch.stack(starts, dim=1).view(seqs, groups, g, dk, dv + dk)
    local = local.view(seqs, groups, dk, dv + dk)
    entering_group = []
    for k in range(groups):
        entering_group.append(w)
        w = torch.baddbmm(local[:, k, :, :dv], local[:, k, :, dv:], w)
    entering_group = torch.stack(entering_group, dim=1)  # (S, G, Dk, Dv)
    entering = torch.matmul(starts[..., dv:], entering_group[:, :, None]) + starts[..., :dv]
    return entering.reshape(seqs, groups * g, dk, dv)[:, :m], w


def sequential_walk(step: torch.Tensor, push: torch.Tensor, w: torch.Tensor,
                    reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`affine_walk`'s contract, one batched multiply-add a chunk."""
    entering = [None] * step.shape[1]
    for c in range(step.shape[1] - 1, -1, -1) if reverse else range(step.shape[1]):
        entering[c] = w
        w = torch.baddbmm(push[:, c], step[:, c], w)
    return torch.stack(entering, dim=1), w
