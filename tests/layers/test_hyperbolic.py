"""Poincaré-ball window attention: the blocked O(N·w) form against the N×N definition (Möbius
distances, band mask) in float64, the norm/dot-product distance against Möbius addition,
streaming with the carried keys, causality, finite gradients near the boundary."""

import pytest
import torch

from muse.layers.hyperbolic import (
    MAX_TANGENT_RADIUS,
    PoincareWindowAttention,
    expmap0,
    mobius_distance,
    poincare_attention_reference,
    poincare_distance,
    poincare_local_attention,
)

TOL = 1e-10


def qkv(n, seed=0, b=2, h=3, d=8, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


BETA = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)


@pytest.mark.parametrize("c", [0.3, 1.0, 2.5])
def test_distance_from_norms_and_dot_products_equals_mobius_addition(c):
    # radii up to 0.999/√c: nearer the boundary Möbius addition's artanh(1 − ε) is the one that
    # loses digits (the sech² factor of ours is exact), so the 1e-10 check stays inside that
    q, k, _ = qkv(9, seed=1, scale=0.5)
    ours = poincare_distance(q, k, c)
    ref = mobius_distance(expmap0(q, c), expmap0(k, c), c)
    assert torch.allclose(ours, ref, rtol=TOL, atol=TOL)
    assert (ours > 0).all() and torch.allclose(poincare_distance(k, q, c), ours.transpose(-1, -2),
                                               rtol=TOL, atol=TOL)


def test_expmap0_lands_inside_the_ball():
    u = torch.randn(50, 8, dtype=torch.float64) * 10
    for c in (0.5, 1.0, 4.0):
        assert (c * expmap0(u, c).square().sum(-1) < 1).all()


@pytest.mark.parametrize("n", [1, 5, 16, 17, 50])
@pytest.mark.parametrize("window", [1, 3, 8, 16, 64])
def test_blocked_form_equals_the_definition(n, window):
    q, k, v = qkv(n, seed=n * 100 + window)
    ours = poincare_local_attention(q, k, v, window, 0.8, BETA)
    ref = poincare_attention_reference(q, k, v, window, 0.8, BETA)
    assert torch.allclose(ours, ref, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("n, window", [(5, 3), (50, 16)])
def test_gradients_equal_the_definitions(n, window):
    """The weights are formed again in backward (a checkpoint): ∂q, ∂k, ∂v and ∂β as the
    N×N definition's."""
    up = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for fn in (poincare_local_attention, poincare_attention_reference):
        leaves = [t.requires_grad_() for t in (*qkv(n, seed=n), BETA.clone())]
        (fn(*leaves[:3], window, 0.8, leaves[3]) * up).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_autograd_keeps_one_weight_tensor_per_block_not_the_score_chain():
    window = 8
    q, k, v = (t.float().requires_grad_() for t in qkv(64))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        poincare_local_attention(q, k, v, window, 1.0, BETA.float())
    blocks = [t for t in kept if t.dim() == 5 and t.shape[-2:] == (window, 2 * window)]
    assert len(blocks) == 1, [(tuple(t.shape), t.dtype) for t in blocks]


def test_each_output_reads_only_its_window():
    q, k, v = qkv(30, seed=3)
    y = poincare_local_attention(q, k, v, 5, 1.0, BETA)
    v2 = v.clone()
    v2[:, :, 10] += 1.0  # token 10 is seen by 10 … 14 only
    y2 = poincare_local_attention(q, k, v2, 5, 1.0, BETA)
    changed = (y2 - y).abs().amax(dim=(0, 1, 3)) > 0
    assert changed.nonzero().flatten().tolist() == list(range(10, 15))


@pytest.mark.parametrize("window", [1, 4, 16])
@pytest.mark.parametrize("cuts", [(3,), (3, 20, 21), (7, 8, 9, 10)])
def test_segments_with_the_carried_keys_equal_one_run(window, cuts):
    torch.manual_seed(window)
    layer = PoincareWindowAttention(d_model=12, n_heads=2, head_dim=6, window=window).double()
    x = torch.randn(2, 40, 12, dtype=torch.float64)
    whole = layer(x)
    state, parts = layer.init_state(2), []
    for a, b in zip((0, *cuts), (*cuts, 40), strict=True):
        y, state = layer(x[:, a:b], state)
        parts.append(y)
        assert state["k"].shape[2] == min(window - 1, b)
    assert torch.allclose(torch.cat(parts, 1), whole, rtol=TOL, atol=TOL)


def test_future_inputs_do_not_move_past_outputs():
    torch.manual_seed(0)
    layer = PoincareWindowAttention(d_model=12, n_heads=2, head_dim=6, window=8).double()
    x = torch.randn(1, 25, 12, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 17:] = torch.randn(1, 8, 12, dtype=torch.float64)
    y, y2 = layer(x), layer(x2)
    assert torch.equal(y[:, :17], y2[:, :17]) and not torch.equal(y[:, 17:], y2[:, 17:])


def test_gradients_are_finite_past_the_radius_cap_and_at_zero_keys():
    q, k, v = (t.float().requires_grad_() for t in qkv(20, seed=4, scale=10.0))
    beta = BETA.float()
    # tangent norms ≈ 10·√8 ≫ the cap: distances stay finite in float32
    y = poincare_local_attention(q, k, v, 8, 1.0, beta)
    (y.sum() + poincare_local_attention(q, torch.zeros_like(k), v, 8, 1.0, beta).sum()).backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert MAX_TANGENT_RADIUS < 9  # below float32's tanh saturation


def test_bad_window_or_past_raises():
    q, k, v = qkv(4)
    with pytest.raises(ValueError, match="window must be"):
        poincare_local_attention(q, k, v, 0, 1.0, BETA)
    with pytest.raises(ValueError, match="past must lie in"):
        poincare_local_attention(q, k, v, 3, 1.0, BETA, past=3)
    with pytest.raises(ValueError, match="curvature and beta_init"):
        PoincareWindowAttention(d_model=8, n_heads=1, head_dim=8, window=4, curvature=0.0)
