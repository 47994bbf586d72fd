"""Inclusive associative scan along dim 1 in plain PyTorch, any device, differentiable.

Odd–even recursion (the Blelloch scheme written recursively): combine neighbouring pairs, scan
the half-length sequence, then fix up the even positions. O(N) work, O(log N) depth.
`combine(earlier, later)` takes and returns tuples of tensors shaped (B, n, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Elems = tuple[torch.Tensor, ...]


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """even (B, ⌈n/2⌉, …), odd (B, ⌊n/2⌋, …) → (B, n, …) with even at 0, 2, 4, …"""
    n_odd = odd.shape[1]
    pairs = torch.stack((even[:, :n_odd], odd), dim=2).flatten(1, 2)
    return torch.cat((pairs, even[:, n_odd:]), dim=1)


def associative_scan(elems: Elems, combine: Callable[[Elems, Elems], Elems]) -> Elems:
    n = elems[0].shape[1]
    if n == 1:
        return elems
    even = tuple(x[:, 0 : n - 1 : 2] for x in elems)
    odd = tuple(x[:, 1::2] for x in elems)
    odd_prefix = associative_scan(combine(even, odd), combine)  # prefixes ending at 1, 3, 5, …
    head = tuple(x[:, :1] for x in elems)
    rest = combine(
        tuple(p[:, : (n + 1) // 2 - 1] for p in odd_prefix), tuple(x[:, 2::2] for x in elems)
    )
    even_prefix = tuple(torch.cat((h, r), dim=1) for h, r in zip(head, rest, strict=True))
    return tuple(_interleave(e, o) for e, o in zip(even_prefix, odd_prefix, strict=True))
