"""One autocast copy of an activation for all of the matmuls that read it.

Under autocast every Linear and Conv1d casts a float32 input to the autocast dtype itself, and
autograd keeps each cast for backward: a block whose normed input feeds seven projections (phase7:
the BK gate's two, the window attention's qkv, the AR-SSM's conv, gate, u and w) keeps seven bf16
copies of it. `autocast_read(x)` hands each reader the same copy, cast once, so backward keeps
one. Each reader still gets its own cast node, whose backward casts that reader's gradient back
to x's dtype, so the gradients add up in float32 as they did through autocast's own casts: the
values, forward and backward, are autocast's.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

# x → (x's version when cast, the cast): one entry per live activation, gone with it
_CASTS = WeakIdKeyDictionary()


class _Read(torch.autograd.Function):
    """`cast` (x in the autocast dtype) as one reader's input; backward: the reader's gradient
    in x's dtype, as autocast's cast gives it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


def autocast_read(x: torch.Tensor) -> torch.Tensor:
    """x as a matmul under autocast would read it: where autocast is on for x's device and
    would cast x (float32), the autocast-dtype copy of x shared by every call on this x (formed
    on the first, again if x was changed in place since); elsewhere x itself."""
    device = x.device.type
    if x.dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return x
    dtype = torch.get_autocast_dtype(device)
    if torch.compiler.is_compiling():  # the graph shares one cast itself; the cache would split it
        return x.to(dtype)
    # an inference tensor has no version counter to tell a stale copy by, and keeps nothing
    # for backward
    if x.is_inference():
        return x.to(dtype)
    entry = _CASTS.get(x)
    if entry is None or entry[0] != x._version or entry[1].dtype != dtype:
        entry = (x._version, x.detach().to(dtype))
        _CASTS[x] = entry
    if torch.is_grad_enabled() and x.requires_grad:
        return _Read.apply(x, entry[1])
    return entry[1]


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the dtype a matmul or conv under autocast would run them in (autocast's
    casts, each an autograd node whose backward returns the gradient in the original dtype),
    for code that then runs with autocast off; as they are where autocast is off."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    # autocast leaves float64 as it is and casts every other floating dtype
    return tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in tensors)
