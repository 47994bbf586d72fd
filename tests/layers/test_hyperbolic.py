"""Poincaré-ball window attention: the blocked O(N·w) form against the N×N definition (Möbius
distances, band mask) in float64, the norm/dot-product distance against Möbius addition, the
one-node form against autograd through its composition and what it keeps for backward,
streaming with the carried keys, causality, finite gradients near the boundary."""

import pytest
import torch
import torch.nn.functional as F

from muse.layers.hyperbolic import (
    MAX_TANGENT_RADIUS,
    PoincareWindowAttention,
    _ball,
    _weights,
    expmap0,
    mobius_distance,
    poincare_attention_reference,
    poincare_distance,
    poincare_local_attention,
)
from muse.layers.local_attention import _band

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


@pytest.mark.parametrize("recompute_dot", [False, True])
@pytest.mark.parametrize("n, window", [(5, 3), (50, 16)])
def test_gradients_equal_the_definitions(n, window, recompute_dot):
    """The weights are formed again in backward (one autograd node): ∂q, ∂k, ∂v and ∂β as the
    N×N definition's."""
    up = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for fn in (lambda *a: poincare_local_attention(*a, recompute_dot=recompute_dot),
               poincare_attention_reference):
        leaves = [t.requires_grad_() for t in (*qkv(n, seed=n), BETA.clone())]
        (fn(*leaves[:3], window, 0.8, leaves[3]) * up).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def _composed(q, k, v, window, c, beta, past=0):
    """The blocked form as plain autograd ops (what the layer ran before its one node, less the
    checkpoint): autograd keeps the ball maps in float32, the repeated key and value blocks and
    every step of the score chain."""
    bsz, heads, n, d = q.shape
    m = -(-n // window)
    wide = torch.promote_types(q.dtype, torch.float32)
    front, back = window - past, m * window - n

    def blocks(t):
        return t.unfold(2, 2 * window, window).transpose(-1, -2)

    xk, nk, dk = (blocks(t) for t in _ball(F.pad(k.to(wide), (0, 0, front, back)), c))
    vp = blocks(F.pad(v, (0, 0, front, back)))
    xq, nq, dq = (t.view(bsz, heads, m, window, -1)
                  for t in _ball(F.pad(q.to(wide), (0, 0, 0, back)), c))
    band = _band(window, past, q.device)
    mask = torch.cat((band[:1], band[1:].expand(m - 1, -1, -1)))
    weights = _weights(xq @ xk.transpose(-1, -2), nq, nk, dq, dk, beta.to(wide), mask, c, v.dtype)
    return (weights @ vp).reshape(bsz, heads, m * window, d)[:, :, :n]


def _run(fn, inputs, up, autocast=False):
    leaves = [t.clone().requires_grad_() for t in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(*leaves)
    (y * up.to(y.dtype)).sum().backward()
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("recompute_dot", [False, True])
@pytest.mark.parametrize("n, window, past", [(1, 4, 0), (7, 8, 3), (50, 16, 0), (50, 16, 15),
                                             (64, 16, 5)])
def test_the_node_equals_its_composition(n, window, past, recompute_dot):
    """y and ∂q, ∂k, ∂v, ∂β of the node (ball maps, score chain and weights formed again in
    backward, the dot products kept or formed again) against autograd through the plain ops,
    in float64, with carried keys and a partial last block."""
    g = torch.Generator().manual_seed(n + past)
    q = torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, past + n, 8, generator=g, dtype=torch.float64) for _ in range(2))
    up = torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64)
    ours = _run(lambda *a: poincare_local_attention(*a[:3], window, 0.8, a[3], past=past,
                                                    recompute_dot=recompute_dot),
                (q, k, v, BETA), up)
    ref = _run(lambda *a: _composed(*a[:3], window, 0.8, a[3], past=past), (q, k, v, BETA), up)
    for name, a, b in zip(("y", "q", "k", "v", "beta"), ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=name)


@pytest.mark.parametrize("recompute_dot", [False, True])
def test_under_bf16_autocast_the_node_forms_what_the_composition_forms(recompute_dot):
    """Under autocast the dot products are a bf16 matmul (autocast's) and the rest float32: the
    node, which runs with autocast off, applies the same casts by hand, so its output is the
    composition's bit for bit and its gradients agree to bf16's rounding."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    beta = torch.tensor([0.7, 2.0])
    up = torch.randn(1, 2, 40, 16, generator=g)
    ours = _run(lambda *a: poincare_local_attention(*a[:3], 16, 1.0, a[3],
                                                    recompute_dot=recompute_dot),
                (q, k, v, beta), up, autocast=True)
    ref = _run(lambda *a: _composed(*a[:3], 16, 1.0, a[3]), (q, k, v, beta), up, autocast=True)
    assert torch.equal(ours[0], ref[0])
    for name, a, b in zip(("q", "k", "v", "beta"), ours[1:], ref[1:], strict=True):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6, msg=name)


def _kept(fn, *inputs) -> dict[int, tuple]:
    """{storage: (bytes, dtype)} of what autograd keeps while fn(*inputs) runs, each storage
    once."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return kept


@pytest.mark.parametrize("recompute_dot", [False, True])
def test_backward_keeps_q_k_the_values_once_and_the_bf16_dot_products(recompute_dot):
    """Under bf16 autocast, per token and head (d = 64, w = 32): q and k as given (2·2d bytes),
    the values padded once (2d and the w front slots, not the 2w-key blocks that repeat each
    twice), β, and the bf16 dot products (2·2w) unless recompute_dot, where the composition
    keeps the float32 ball maps of q and k, the bf16 copies of the repeated key and value
    blocks, the dot products and the weights besides."""
    bsz, heads, n, d, window = 1, 2, 256, 64, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(bsz, heads, n, d, generator=g).to(torch.bfloat16).requires_grad_()
               for _ in range(3))
    beta = torch.tensor([0.7, 2.0], requires_grad=True)

    def node(*a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return poincare_local_attention(*a[:3], window, 1.0, a[3],
                                            recompute_dot=recompute_dot)

    def composed(*a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _composed(*a[:3], window, 1.0, a[3])

    kept = _kept(node, q, k, v, beta)
    dot = [] if recompute_dot else [bsz * heads * n * 2 * window * 2]
    assert sorted(b for b, _ in kept.values()) == sorted(
        [heads * 4, *[bsz * heads * n * d * 2] * 2, bsz * heads * (window + n) * d * 2, *dot])
    assert all(dt == torch.bfloat16 for b, dt in kept.values() if b > heads * 4)
    per_token = [sum(b for b, _ in saved.values() if b > heads * 4) / (bsz * heads * n)
                 for saved in (kept, _kept(composed, q, k, v, beta))]
    assert per_token[0] == 3 * 2 * d + 2 * d * window / n + (0 if recompute_dot else 4 * window)
    assert per_token[1] > 3 * per_token[0]


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
