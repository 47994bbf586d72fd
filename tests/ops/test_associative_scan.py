"""The generic inclusive scan under BK-Core (`muse/ops/associative_scan.py`) and the reverse
linear recurrence of its adjoint (`muse/ops/bk_core/scan.py`), against plain sequential loops."""

from __future__ import annotations

import math

import pytest
import torch

from muse.ops.associative_scan import associative_scan
from muse.ops.bk_core.scan import reverse_linear_recurrence

LENGTHS = [*range(1, 34), 63, 64, 65, 127, 128, 129, 257]


def affine_combine(earlier, later):
    """x ↦ c·x + b composed: later ∘ earlier. Not commutative, so a scan that combines in the
    wrong order, or skips or repeats an element, gives a different answer."""
    (ce, be), (cl, bl) = earlier, later
    return cl * ce, cl * be + bl


def sequential(elems, combine):
    out = [tuple(x[:, :1] for x in elems)]
    for i in range(1, elems[0].shape[1]):
        out.append(combine(out[-1], tuple(x[:, i : i + 1] for x in elems)))
    return tuple(torch.cat(parts, dim=1) for parts in zip(*out, strict=True))


@pytest.mark.parametrize("n", LENGTHS)
def test_scan_equals_sequential_fold_exactly(n):
    """Coefficients c = ±1 and small integer offsets b: every partial result is an integer below
    2^53, so float64 is exact and the comparison is torch.equal, with trailing dimensions."""
    gen = torch.Generator().manual_seed(n)
    c = (2 * torch.randint(0, 2, (2, n, 3, 2), generator=gen) - 1).double()
    b = torch.randint(-9, 10, (2, n, 3, 2), generator=gen).double()
    got = associative_scan((c, b), affine_combine)
    want = sequential((c, b), affine_combine)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 100, 1000, 4097])
def test_scan_does_linear_work_in_logarithmic_depth(n):
    """O(N) work: the combines see fewer than 2N element pairs in all. O(log N) depth: the
    recursion halves N per level and calls combine twice per level."""
    pairs, calls = [0], [0]

    def counting(earlier, later):
        pairs[0] += later[0].shape[1]
        calls[0] += 1
        return affine_combine(earlier, later)

    x = torch.ones(1, n, 1)
    associative_scan((x, x), counting)
    assert pairs[0] < 2 * n
    assert calls[0] <= 2 * math.ceil(math.log2(n))


def test_scan_is_differentiable():
    gen = torch.Generator().manual_seed(1)
    c = (0.5 + torch.rand(2, 9, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    b = torch.randn(2, 9, 2, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, b: associative_scan((c, b), affine_combine), (c, b))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 256, 1000])
def test_reverse_linear_recurrence_matches_loop(n):
    """λ_i = b_i + c_i λ_{i+1}, λ_N = 0, complex128; |c| < 1 keeps products in range, so the
    loop and the scan differ by rounding only (~1e-15): bound 1e-12. c_{N−1} must be ignored:
    it is set to a huge value that would show."""
    gen = torch.Generator().manual_seed(n)
    shape = (2, n, 3)
    c = (
        torch.complex(
            torch.randn(*shape, generator=gen, dtype=torch.float64),
            torch.randn(*shape, generator=gen, dtype=torch.float64),
        )
        * 0.4
    )
    b = torch.complex(
        torch.randn(*shape, generator=gen, dtype=torch.float64),
        torch.randn(*shape, generator=gen, dtype=torch.float64),
    )
    c[:, -1] = 1e30
    lam = reverse_linear_recurrence(c, b)
    want = torch.empty_like(b)
    want[:, -1] = b[:, -1]
    for i in range(n - 2, -1, -1):
        want[:, i] = b[:, i] + c[:, i] * want[:, i + 1]
    assert ((lam - want).abs().max() / want.abs().max()).item() <= 1e-12
