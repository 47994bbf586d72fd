"""X = (I + A)⁻¹ R for a batch of strictly lower-triangular A: the chunked delta rule's solve.

The inverse is formed once, by one triangular solve against I (T right-hand sides, not R's
width), and applied as a matrix product; backward is two more products with it, where a solve's
own backward would run a second triangular solve (cuBLAS's batched solve of many small systems
is far slower than a batched product of the same shapes). fla's chunk kernels take the same
route, forming (I + A)⁻¹ and multiplying."""

from __future__ import annotations

import torch


class UnitLowerSolve(torch.autograd.Function):
    """(a (…, T, T), rhs (…, T, R)) → (I + tril(a, −1))⁻¹ rhs: a's diagonal and the entries
    above it are not read, and take no gradient. Keeps the inverse and the result for backward,
    the same bytes as autograd keeps for `torch.linalg.solve_triangular` (the matrix and the
    result)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        inverse = torch.linalg.solve_triangular(a, eye.expand_as(a), upper=False,
                                                unitriangular=True)
        x = inverse @ rhs
        ctx.save_for_backward(inverse, x)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x: torch.Tensor):
        inverse, x = ctx.saved_tensors
        need_a, need_rhs = ctx.needs_input_grad
        # (I + A) X = R: dR = (I + A)⁻ᵀ dX and dA = −dR Xᵀ, kept strictly below the diagonal
        grad_rhs = inverse.transpose(-1, -2) @ grad_x
        grad_a = torch.tril(grad_rhs @ x.transpose(-1, -2), -1).neg_() if need_a else None
        return grad_a, grad_rhs if need_rhs else None


def unit_lower_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(I + tril(a, −1))⁻¹ rhs, batched over the leading dimensions (see `UnitLowerSolve`)."""
    if a.shape[-1] != a.shape[-2] or a.shape[-1] != rhs.shape[-2]:
        raise ValueError(f"a must be (…, T, T) and rhs (…, T, R), got {tuple(a.shape)} and "
                         f"{tuple(rhs.shape)}")
    return UnitLowerSolve.apply(a, rhs)
