"""The chunked complex decayed scan against its per-token loop in complex128 (1e-12: only the
summation order differs), planar and native, across chunk boundaries and levels."""

import pytest
import torch

from muse.ops.complex_scan import complex_decayed_cumsum, complex_recurrence_naive

TOL = 1e-12


def decay(r=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_mag = -torch.rand(r, generator=g, dtype=torch.float64) * 0.3
    angle = (torch.rand(r, generator=g, dtype=torch.float64) - 0.5) * 6
    return log_mag, angle, torch.exp(torch.complex(log_mag, angle))


def planar(z):
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("n, chunk", [(1, 4), (4, 4), (5, 4), (37, 4), (100, 8), (300, 4)],
                         ids=lambda x: str(x))
def test_native_and_planar_equal_the_loop(n, chunk):
    log_mag, angle, lam = decay()
    u = torch.randn(2, n, 6, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    want = complex_recurrence_naive(u, lam)
    torch.testing.assert_close(complex_decayed_cumsum(u, log_mag, angle, chunk), want,
                               rtol=0, atol=TOL)
    torch.testing.assert_close(complex_decayed_cumsum(planar(u), log_mag, angle, chunk),
                               planar(want), rtol=0, atol=TOL)


def test_gradients_equal_the_loop():
    log_mag, angle, _ = decay()
    log_mag.requires_grad_(), angle.requires_grad_()
    u = torch.randn(1, 45, 6, dtype=torch.complex128, requires_grad=True)
    w = torch.randn(1, 45, 6, dtype=torch.complex128)

    def loss(h):
        return (h * w.conj()).real.sum()

    lam = torch.exp(torch.complex(log_mag, angle))
    want = torch.autograd.grad(loss(complex_recurrence_naive(u, lam)), (u, log_mag, angle))
    got = torch.autograd.grad(loss(complex_decayed_cumsum(u, log_mag, angle, 4)),
                              (u, log_mag, angle))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_future_inputs_do_not_move_past_states():
    log_mag, angle, _ = decay()
    u = torch.randn(2, 40, 12, dtype=torch.float64)
    h = complex_decayed_cumsum(u, log_mag, angle, 8)
    u2 = u.clone()
    u2[:, 17:] += 1.0
    h2 = complex_decayed_cumsum(u2, log_mag, angle, 8)
    assert torch.equal(h[:, :17], h2[:, :17]) and (h[:, 17:] - h2[:, 17:]).abs().max() > 0.1


def test_bf16_planes_stay_close_to_complex128():
    log_mag, angle, lam = decay()
    u = torch.randn(2, 300, 6, dtype=torch.complex128)
    h = complex_decayed_cumsum(planar(u).bfloat16(), log_mag.float(), angle.float(), 16)
    assert h.dtype == torch.bfloat16
    want = planar(complex_recurrence_naive(u, lam))
    assert ((h.double() - want).norm() / want.norm()) < 2e-2


def test_shapes_are_checked():
    log_mag, angle, _ = decay()
    with pytest.raises(ValueError, match=r"\(B, N, 2R\) planar"):
        complex_decayed_cumsum(torch.zeros(1, 3, 6), log_mag, angle)
    with pytest.raises(ValueError, match="chunk must be ≥ 2, got 1"):
        complex_decayed_cumsum(torch.zeros(1, 3, 12), log_mag, angle, chunk=1)
