"""BK-Core in parallel form, plain PyTorch (any device): forward and exact adjoint.

Forward: each step of the causal recurrence is a Möbius map, i.e. the 2×2 matrix
M_i = [[0, 1], [−k_{i−1}, α_i]] acting on (p, q) with g = p/q (k_{−1} = 0, start (0, 1)).
The prefix products P_i = M_i ⋯ M_0 come from an associative scan, and g_i = P_i[0,1] / P_i[1,1].
Every partial product is divided by its largest entry: the ratio is unchanged (projective
normalisation), and the raw products — the leading minors θ_i — overflow near N ≈ 1.4k.

Backward: the adjoint of g_i = 1/(α_i − k_{i−1} g_{i−1}) is the reverse linear recurrence
λ_i = ḡ_i + conj(k_i g_{i+1}²) λ_{i+1}, then ∂L/∂α_i = −conj(g_i²) λ_i and
∂L/∂k_i = Re(conj(g_i g_{i+1}²) λ_{i+1}) (PyTorch's conjugate-Wirtinger convention).
"""

from __future__ import annotations

import torch

from muse.ops.associative_scan import Elems, associative_scan


def _mobius_combine(earlier: Elems, later: Elems) -> Elems:
    e00, e01, e10, e11 = earlier
    l00, l01, l10, l11 = later
    m = (
        l00 * e00 + l01 * e10,
        l00 * e01 + l01 * e11,
        l10 * e00 + l11 * e10,
        l10 * e01 + l11 * e11,
    )
    # max(|Re|, |Im|) over the four entries: within √2 of the largest modulus, no square roots.
    scale = torch.stack([torch.maximum(x.real.abs(), x.imag.abs()) for x in m]).amax(dim=0)
    return tuple(x / scale for x in m)


def causal_scan(alpha: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """alpha (B, N, C) complex, k (B|1, N−1, C) real → g (B, N, C) complex."""
    bsz, n, ch = alpha.shape
    k_prev = torch.cat((k.new_zeros(k.shape[0], 1, ch), k), dim=1).expand(bsz, n, ch)
    m10 = (-k_prev).to(alpha.dtype)
    m00 = torch.zeros_like(alpha)
    m01 = torch.ones_like(alpha)
    _, p01, _, p11 = associative_scan((m00, m01, m10, alpha), _mobius_combine)
    return p01 / p11


def _affine_combine(earlier: Elems, later: Elems) -> Elems:
    (ce, be), (cl, bl) = earlier, later
    return cl * ce, cl * be + bl


def reverse_linear_recurrence(c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """λ_i = b_i + c_i λ_{i+1} with λ_N = 0 (c_{N−1} is not used), along dim 1."""
    c = torch.cat((c[:, :-1], torch.zeros_like(c[:, -1:])), dim=1)
    _, lam = associative_scan((c.flip(1), b.flip(1)), _affine_combine)
    return lam.flip(1)


def causal_adjoint(
    g: torch.Tensor, k: torch.Tensor, grad_g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of a real loss w.r.t. alpha (complex) and k (real) from ∂L/∂g."""
    g2 = g * g
    step = torch.cat((torch.conj(k * g2[:, 1:]), torch.zeros_like(g2[:, :1])), dim=1)
    lam = reverse_linear_recurrence(step, grad_g.to(g.dtype))
    grad_alpha = -torch.conj(g2) * lam
    grad_k = (torch.conj(g2[:, 1:] * g[:, :-1]) * lam[:, 1:]).real
    if k.shape[0] == 1 and grad_k.shape[0] > 1:
        grad_k = grad_k.sum(dim=0, keepdim=True)
    return grad_alpha, grad_k.to(k.dtype)
