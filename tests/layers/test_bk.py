"""BKMixer against the float64 BK-Core oracle, causality, and gradient to every parameter."""

import torch
import torch.nn.functional as F

from muse.layers.bk import BKMixer, NonHermitianBKMixer
from muse.ops.bk_core.naive import bk_core_reference

from .saved import saved_storages


def mixer(d=16, c=4, seed=0):
    torch.manual_seed(seed)
    return BKMixer(d_model=d, channels=c).double()


def test_matches_the_reference_recurrence_in_float64():
    m = mixer()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    a = m.potential(x) + m.a0
    k = F.softplus(m.coupling(x[:, :-1]))
    z = torch.complex(m.z_real, F.softplus(m.z_imag) + 1e-3)
    g = bk_core_reference(a, k, z)
    expected = m.out(torch.cat((g.real, g.imag), dim=-1))
    # both sides are float64 throughout: the scan and the sequential recurrence agree to ~1e-15
    assert torch.allclose(m(x), expected, rtol=0, atol=1e-12)


def test_causal_bit_identical():
    m = mixer()
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    y = m(x)
    x2 = x.clone()
    x2[:, 21:] = torch.randn(1, 19, 16, dtype=torch.float64)
    y2 = m(x2)
    assert torch.equal(y[:, :21], y2[:, :21])
    assert not torch.equal(y[:, 21:], y2[:, 21:])


def test_gradient_reaches_every_parameter_and_the_first_token():
    m = mixer()
    x = torch.randn(1, 64, 16, dtype=torch.float64, requires_grad=True)
    m(x)[:, -1].sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad[0, 0].abs().sum() > 0  # the last output depends on the first token


def test_fp16_input_accumulates_in_fp32_and_returns_fp16():
    torch.manual_seed(0)
    m = BKMixer(d_model=16, channels=4).half()
    x = torch.randn(1, 9, 16).half()
    y = m(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_non_hermitian_potential_enters_the_resolvent():
    from muse.layers.bk import NonHermitianBKMixer

    torch.manual_seed(0)
    m = NonHermitianBKMixer(d_model=16, channels=4).double()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    gamma = m.gamma(x)
    assert (gamma >= 1e-3).all()
    a = torch.complex(m.potential(x) + m.a0, -gamma)
    k = F.softplus(m.coupling(x[:, :-1]))
    z = torch.complex(m.z_real, F.softplus(m.z_imag) + 1e-3)
    g = bk_core_reference(a, k, z)
    assert torch.allclose(m(x), m.out(torch.cat((g.real, g.imag), dim=-1)), rtol=0, atol=1e-12)
    # more dissipation, smaller Green's function: Γ really is in the diagonal
    bound = 1.0 / (gamma + z.imag)
    assert (g.abs() <= bound * (1 + 1e-9)).all()
    with torch.no_grad():
        m.dissipation.bias.add_(5.0)
    assert not torch.allclose(m(x), m.out(torch.cat((g.real, g.imag), dim=-1)))


def test_carried_boundary_value_resumes_the_recurrence_exactly():
    """Segments [0:a), [a:b), … with the carry k_{a−1}·g_{a−1} give one run's output, in
    float64 to ~1e-15 (tolerance 1e-12), for the Hermitian and the non-Hermitian mixer."""
    for cls in (BKMixer, NonHermitianBKMixer):
        torch.manual_seed(5)
        m = cls(d_model=16, channels=4, backend="scan").double()
        x = torch.randn(2, 40, 16, dtype=torch.float64)
        whole = m(x)
        carry = m.init_carry(2)
        assert carry.shape == (2, 4) and carry.dtype == torch.complex128
        first, _ = m(x, carry)
        assert torch.allclose(first, whole, rtol=0, atol=1e-13)  # a zero carry changes nothing
        parts = []
        for a, b in [(0, 1), (1, 17), (17, 39), (39, 40)]:
            out, carry = m(x[:, a:b], carry)
            parts.append(out)
        assert torch.allclose(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-12)


def test_the_projections_keep_one_bf16_copy_of_x():
    """The potential, the coupling and the dissipation read x: under bf16 autocast backward
    keeps one bf16 copy of it (the coupling a view of that copy), not one a projection."""
    torch.manual_seed(0)
    m = NonHermitianBKMixer(d_model=16, channels=4)
    x = torch.randn(1, 24, 16).requires_grad_()
    copies = [t for t in saved_storages(m, x * 1) if t.dtype == torch.bfloat16
              and t.untyped_storage().nbytes() == x.numel() * 2]
    assert len(copies) == 1
    whole = copies[0].new_empty(0).set_(copies[0].untyped_storage(), 0, x.shape)
    assert torch.equal(whole, x.detach().to(torch.bfloat16))
