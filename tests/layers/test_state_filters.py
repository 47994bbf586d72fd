"""The SNR rule and the zeta-zero resonance projection on constructed states, in float64."""

import math

import pytest
import torch

from muse.layers.state_filters import (
    Resonance,
    check_snr_config,
    resonance_basis,
    resonance_filter,
    snr_adjustments,
    state_snr,
)
from muse.layers.zeta import zeta_zeros

F64 = torch.float64


def constructed_states(d=4):
    """Per head, a W whose SNR is known in closed form."""
    n = d * d
    spike = torch.zeros(d, d, dtype=F64)
    spike[1, 2] = 3.0  # mean|W| = 3/n, std = 3√(n−1)/n: SNR = 1/√(n−1)
    signs = torch.ones(d, d, dtype=F64)
    signs[:, ::2] = -1.0
    plus_minus = 0.7 * signs  # mean 0, |W| = std = 0.7: SNR = 1
    constant = torch.full((d, d), 0.2, dtype=F64)  # std 0: SNR = ∞
    zero = torch.zeros(d, d, dtype=F64)  # empty memory: SNR = ∞ by definition
    w = torch.stack((spike, plus_minus, constant, zero))[None]  # (B=1, H=4, d, d)
    return w, [1 / math.sqrt(n - 1), 1.0, math.inf, math.inf]


def test_snr_of_constructed_states():
    w, want = constructed_states()
    got = state_snr(w)[0].tolist()
    for g, s in zip(got, want, strict=True):
        assert g == s if math.isinf(s) else abs(g - s) < 1e-12


def test_snr_rule_forgets_and_writes_less_below_the_threshold_only():
    w, snr = constructed_states()
    tau, c_gamma, c_eta = 0.5, 0.1, 0.4
    gamma, eta = snr_adjustments(w, tau, c_gamma, c_eta)
    deficit = [max(0.0, 1 - s / tau) for s in snr]  # only the spiky head is below τ
    assert deficit[0] > 0 and deficit[1:] == [0.0, 0.0, 0.0]
    want_gamma = torch.tensor([[c_gamma * d for d in deficit]], dtype=F64)
    want_eta = torch.tensor([[1 - c_eta * d for d in deficit]], dtype=F64)
    assert torch.allclose(gamma, want_gamma, rtol=0, atol=1e-12)
    assert torch.allclose(eta, want_eta, rtol=0, atol=1e-12)
    # at SNR = 0 the deficit saturates at 1
    assert snr_adjustments(w, 1e12, c_gamma, c_eta)[0][0, 0].item() == pytest.approx(c_gamma)


def test_snr_adjustments_carry_no_gradient():
    w = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(3),
                    requires_grad=True)
    gamma, eta = snr_adjustments(w, 2.0, 0.1, 0.5)
    assert not gamma.requires_grad and not eta.requires_grad
    assert (gamma > 0).all()  # Gaussian entries: SNR ≈ 0.8 < τ = 2


@pytest.mark.parametrize(
    "args, match",
    [((0.0, 0.1, 0.5), "snr_threshold"), ((1.0, -0.1, 0.5), "snr_gamma_scale"),
     ((1.0, 0.1, 1.5), "snr_eta_scale"), ((1.0, 0.0, 0.0), "would do nothing")],
)
def test_bad_snr_settings_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        check_snr_config(*args)


@pytest.mark.parametrize("dim, modes", [(8, 8), (32, 32), (32, 20), (64, 64), (5, 3)])
def test_basis_is_orthonormal_and_starts_at_the_first_zero(dim, modes):
    b = resonance_basis(dim, modes)
    assert b.shape == (dim, modes) and b.dtype == F64
    assert torch.allclose(b.T @ b, torch.eye(modes, dtype=F64), rtol=0, atol=1e-12)
    first = torch.cos(zeta_zeros(1)[0] * (torch.arange(dim, dtype=F64) + 0.5))
    assert torch.allclose(b[:, 0], first / first.norm(), rtol=0, atol=1e-12)


def test_bad_mode_count_is_named():
    with pytest.raises(ValueError, match=r"\[1, 8\].*got 9"):
        resonance_basis(8, 9)
    with pytest.raises(ValueError, match="resonance_threshold"):
        Resonance(head_dim=8, modes=8, threshold=0.0)


def test_resonance_keeps_strong_modes_exactly_and_drops_weak_ones():
    dim = 16
    b = resonance_basis(dim, dim)
    g = torch.Generator().manual_seed(0)
    strong = torch.zeros(dim, dim, dtype=F64)
    strong[0, 0], strong[3, 5], strong[7, 2], strong[15, 15] = 3.0, -2.0, 1.5, 1.0
    weak = 1e-3 * torch.randn(dim, dim, generator=g, dtype=F64) * (strong == 0)
    w = b @ (strong + weak) @ b.T
    # energies: strong ≥ 1 and the largest 9, weak ≤ ~1e-5: threshold 0.01 (0.09) splits them
    kept = resonance_filter(w[None, None], b, 0.01)[0, 0]
    assert torch.allclose(kept, b @ strong @ b.T, rtol=0, atol=1e-12)
    assert (w - kept).norm() > 1e-3  # the weak modes were there and are gone


def test_resonance_is_a_projection():
    b = resonance_basis(16, 12)
    w = torch.randn(3, 2, 16, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    once = resonance_filter(w, b, 0.05)
    twice = resonance_filter(once, b, 0.05)
    assert torch.allclose(twice, once, rtol=0, atol=1e-12)
    # an incomplete basis also drops what lies outside span B ⊗ span B
    u = torch.randn(16, 1, dtype=F64)
    u = u - b @ (b.T @ u)
    outside = u @ u.T
    assert resonance_filter(outside[None], b, 0.05).abs().max() < 1e-12


def test_resonance_module_follows_the_state_dtype_and_passes_gradient():
    m = Resonance(head_dim=8, modes=8, threshold=0.1)
    w = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = m(w)
    assert out.dtype == torch.float32 and out.shape == w.shape
    out.square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    ref = resonance_filter(w.detach().double(), m.basis64, 0.1)
    assert torch.allclose(out.double(), ref, rtol=0, atol=1e-5)
