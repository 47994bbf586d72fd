import pytest
import torch

from muse.ops.unit_lower_solve import unit_lower_solve


def _system(seed, shape=(2, 3, 8), width=5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, shape[-1], generator=g, dtype=torch.float64) * 0.5
    rhs = torch.randn(*shape, width, generator=g, dtype=torch.float64)
    return a, rhs


def test_equals_the_triangular_solve_in_float64():
    """Values and gradients as torch.linalg.solve_triangular's on I + tril(a, −1), to 1e-12."""
    a0, rhs0 = _system(0)
    up = torch.randn_like(rhs0)
    runs = []
    for solve in (unit_lower_solve, lambda a, r: torch.linalg.solve_triangular(
            torch.eye(a.shape[-1], dtype=a.dtype) + torch.tril(a, -1), r, upper=False)):
        a, rhs = (t.clone().requires_grad_() for t in (a0, rhs0))
        x = solve(a, rhs)
        (x * up).sum().backward()
        runs.append((x, a.grad, rhs.grad))
    for got, want in zip(*runs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradients_pass_gradcheck():
    a, rhs = (t.requires_grad_() for t in _system(1, shape=(2, 6), width=3))
    assert torch.autograd.gradcheck(unit_lower_solve, (a, rhs))


def test_reads_nothing_on_or_above_the_diagonal():
    """Entries on and above a's diagonal change neither the result nor take a gradient."""
    a, rhs = _system(2)
    noise = torch.triu(torch.randn_like(a))
    a1 = (a + noise).requires_grad_()
    x = unit_lower_solve(a1, rhs)
    x.sum().backward()
    torch.testing.assert_close(x, unit_lower_solve(a, rhs), rtol=0, atol=0)
    assert torch.count_nonzero(torch.triu(a1.grad)) == 0


def test_mismatched_shapes_name_both():
    a, rhs = _system(3)
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\) and \(2, 3, 7, 5\)"):
        unit_lower_solve(a, rhs[..., :7, :])
