"""The chunked time-invariant recurrence against a sequential loop in float64."""

import pytest
import torch

from muse.ops.decayed_scan.chunk import decayed_cumsum


def loop(u, lam):
    s, out = torch.zeros_like(u[:, 0]), []
    for t in range(u.shape[1]):
        s = lam * s + u[:, t]
        out.append(s)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 63, 64, 65, 200, 4097])
@pytest.mark.parametrize("chunk", [2, 8, 64])
def test_matches_the_loop_in_float64(n, chunk):
    g = torch.Generator().manual_seed(n * 100 + chunk)
    u = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    lam = torch.tensor([1.0, 0.999, 0.9, 0.5, 1e-3], dtype=torch.float64)
    got = decayed_cumsum(u, torch.log(lam), chunk)
    want = loop(u, lam)
    # float64 sums of up to N terms of unit size: relative error ~1e-13 at N = 4097
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_gradient_matches_autograd_through_the_loop():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 77, 3, generator=g, dtype=torch.float64, requires_grad=True)
    nu = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    log_decay = -torch.nn.functional.softplus(nu)
    w = torch.randn(1, 77, 3, generator=g, dtype=torch.float64)
    (decayed_cumsum(u, log_decay, 8) * w).sum().backward()
    gu, gnu = u.grad.clone(), nu.grad.clone()
    u.grad, nu.grad = None, None
    (loop(u, torch.exp(-torch.nn.functional.softplus(nu))) * w).sum().backward()
    assert torch.allclose(gu, u.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gnu, nu.grad, rtol=1e-10, atol=1e-12)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        decayed_cumsum(torch.zeros(2, 5), torch.zeros(5))
    with pytest.raises(ValueError, match="chunk"):
        decayed_cumsum(torch.zeros(1, 5, 2), torch.zeros(2), chunk=1)
