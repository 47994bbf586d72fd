"""`bk_core(a, k, z, mode)`: the one autograd entry point of BK-Core (DESIGN §3.1).

Picks the Triton kernels on CUDA and the PyTorch scan elsewhere; both compute the same forward
and the same exact adjoint (no clamps, no nan_to_num: a non-finite value is a bug to be seen).
Arithmetic is complex64 (fp32 accumulation) for fp16/bf16/fp32 inputs and complex128 for fp64.
"""

from __future__ import annotations

import torch

from muse.ops.bk_core.scan import causal_adjoint, causal_scan

MODES = ("causal", "bidirectional")


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend == "scan":
        return False
    if backend == "triton":
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'scan' or 'triton', got {backend!r}")
    return x.is_cuda and x.dtype == torch.complex64


# Custom ops, so torch.compile keeps BK-Core as one opaque node of the graph (the Triton
# launches are not traced, and no graph break splits a compiled step around them). Outputs are
# contiguous, as the fake ones that compiling plans with.
@torch.library.custom_op("muse::bk_causal", mutates_args=())
def _bk_causal(a: torch.Tensor, k: torch.Tensor, z: torch.Tensor, backend: str) -> torch.Tensor:
    """g for α = a − z; the Triton path subtracts z as it loads a (one pass fewer)."""
    if _use_triton(a, backend):
        from muse.ops.bk_core.triton import causal_forward_triton

        return causal_forward_triton(a, k, z=z).contiguous()
    return causal_scan(a - z, k).contiguous()


@_bk_causal.register_fake
def _(a, k, z, backend):
    return a.new_empty(a.shape)


@torch.library.custom_op("muse::bk_causal_adjoint", mutates_args=())
def _bk_causal_adjoint(g: torch.Tensor, k: torch.Tensor, grad_g: torch.Tensor,
                       triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂α, ∂L/∂k) from g, k and ∂L/∂g."""
    if triton:
        from muse.ops.bk_core.triton import causal_backward_triton

        grad_alpha, grad_k = causal_backward_triton(g, k, grad_g)
    else:
        grad_alpha, grad_k = causal_adjoint(g, k, grad_g)
    return grad_alpha.contiguous(), grad_k.contiguous()


@_bk_causal_adjoint.register_fake
def _(g, k, grad_g, triton):
    return g.new_empty(g.shape), k.new_empty(k.shape)


def _keep_for_adjoint(ctx, inputs, output):
    a, k, _z, backend = inputs
    ctx.triton = _use_triton(a, backend)
    ctx.save_for_backward(output, k)


def _adjoint(ctx, grad_g):
    g, k = ctx.saved_tensors
    grad_alpha, grad_k = _bk_causal_adjoint(g, k, grad_g, ctx.triton)
    # α = a − z is holomorphic in z with derivative −1.
    grad_z = -grad_alpha.sum(dim=(0, 1)) if ctx.needs_input_grad[2] else None
    return grad_alpha, grad_k, grad_z, None


_bk_causal.register_autograd(_adjoint, setup_context=_keep_for_adjoint)


def check_inputs(a: torch.Tensor, k: torch.Tensor, z: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if a.dim() != 3:
        raise ValueError(f"a must be (B, N, C), got shape {tuple(a.shape)}")
    bsz, n, ch = a.shape
    if n == 0:
        raise ValueError("a has N = 0 positions: BK-Core needs N ≥ 1")
    if k.dim() != 3 or k.shape[0] not in (1, bsz) or k.shape[1:] != (n - 1, ch):
        raise ValueError(
            f"k must be ({bsz} or 1, {n - 1}, {ch}) for a of shape {tuple(a.shape)}, "
            f"got {tuple(k.shape)}"
        )
    if k.is_complex():
        raise ValueError("k (the off-diagonal products b·c) must be real and ≥ 0, got complex")
    if z.shape != (ch,):
        raise ValueError(f"z must have one shift per channel, shape ({ch},), got {tuple(z.shape)}")
    if not z.is_complex():
        raise ValueError(f"z must be complex with Im z > 0, got real dtype {z.dtype}")
    if not bool((z.imag > 0).all()):
        raise ValueError(f"z needs Im z > 0 in every channel, got min Im z = {z.imag.min().item()}")
    if k.numel() and not bool((k >= 0).all()):
        raise ValueError(f"k must be ≥ 0 (k = softplus(·) in the models), got min {k.min().item()}")


def bk_core(
    a: torch.Tensor,
    k: torch.Tensor,
    z: torch.Tensor,
    mode: str = "causal",
    *,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Diagonal of the resolvent of the tridiagonal operator, per sequence and channel.

    a: (B, N, C) diagonal, real or complex (a dissipative −iΓ enters as Im a ≤ 0);
    k: (B or 1, N−1, C) real off-diagonal products b·c ≥ 0; z: (C,) complex shift, Im z > 0.
    Returns g: (B, N, C) complex; causal g_i depends on positions ≤ i only. `validate=False`
    skips the value checks (they synchronise a GPU) for callers whose parameterisation
    guarantees them (k = softplus, Im z = softplus + 1e-3).
    """
    if validate:
        check_inputs(a, k, z, mode)
    wide = torch.float64 in (a.dtype, k.dtype) or torch.complex128 in (a.dtype, z.dtype)
    cdtype, rdtype = (torch.complex128, torch.float64) if wide else (torch.complex64, torch.float32)
    a, z, k = a.to(cdtype), z.to(cdtype), k.to(rdtype)
    left = _bk_causal(a, k, z, backend)
    if mode == "causal":
        return left
    right = _bk_causal(a.flip(1), k.flip(1), z, backend).flip(1)
    alpha = a - z
    zero = alpha.new_zeros(alpha.shape[0], 1, alpha.shape[2])
    from_left = torch.cat((zero, k * left[:, :-1]), dim=1)
    from_right = torch.cat((k * right[:, 1:], zero), dim=1)
    return 1.0 / (alpha - from_left - from_right)
