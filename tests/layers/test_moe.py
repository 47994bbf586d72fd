"""Top-k MoE: the sorted/grouped forward against the dense mixture in float64, router gradient,
argument checks, position-wise causality and the load-balancing loss on hand-built routing."""

import math

import pytest
import torch

from muse.layers.moe import MoE, check_ffn_config, moe_dense


def build(n_experts=4, top_k=2, d_model=8, d_ff=16, seed=0):
    torch.manual_seed(seed)
    return MoE(d_model=d_model, d_ff=d_ff, n_experts=n_experts, top_k=top_k).double()


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "n_experts,top_k,seq", [(2, 2, 1), (4, 2, 13), (4, 3, 13), (8, 2, 40), (8, 8, 5)],
    ids=lambda v: str(v),
)
def test_output_equals_the_dense_mixture(n_experts, top_k, seq):
    m = build(n_experts, top_k)
    x = randn(3, seq, 8)
    # same products, summed in another order: float64 agreement to ~1e-16 on values of O(1)
    torch.testing.assert_close(m(x), moe_dense(m, x), rtol=1e-12, atol=1e-12)


def test_gradients_equal_the_dense_mixture():
    m = build(4, 2)
    x = randn(2, 11, 8)
    w = randn(2, 11, 8, seed=2)
    grads = []
    for fn in (m, lambda t: moe_dense(m, t)):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        (fn(xi) * w).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_router_gets_a_gradient_from_the_output_with_top2():
    m = build(4, 2)
    x = randn(2, 11, 8)
    (m(x) * randn(2, 11, 8, seed=2)).sum().backward()  # the output alone, no aux loss
    assert m.router.weight.grad.abs().max() > 1e-6


@pytest.mark.parametrize(
    "n_experts,top_k,match",
    [
        (4, 1, r"top_k must be in \[2, n_experts=4\], got 1"),
        (4, 5, r"top_k must be in \[2, n_experts=4\], got 5"),
        (4, 0, r"top_k must be in \[2, n_experts=4\], got 0"),
        (1, 1, r"n_experts must be ≥ 2 for a mixture, got 1"),
        (4, 2.0, r"top_k must be an integer, got 2.0"),
    ],
)
def test_bad_sizes_are_rejected_naming_the_value_and_the_range(n_experts, top_k, match):
    with pytest.raises(ValueError, match=match):
        MoE(d_model=8, d_ff=16, n_experts=n_experts, top_k=top_k)


def test_ffn_config_checks_name_the_config_keys():
    check_ffn_config("moe", 8, 2, 0.01)
    with pytest.raises(ValueError, match=r"ffn must be one of mlp, swiglu, moe, got 'moe2'"):
        check_ffn_config("moe2", 8, 2, 0.01)
    with pytest.raises(ValueError, match=r"moe_top_k must be in \[2, moe_experts=8\], got 1"):
        check_ffn_config("moe", 8, 1, 0.01)
    with pytest.raises(ValueError, match=r"moe_aux_weight must be a number ≥ 0, got -1"):
        check_ffn_config("moe", 8, 2, -1)


def test_output_at_t_depends_only_on_x_t():
    m = build(4, 2)
    x = randn(2, 20, 8)
    y = m(x)
    x2 = x.clone()
    x2[:, 7] += randn(2, 8, seed=3)  # changes routing of token 7, and so every expert's batch
    y2 = m(x2)
    changed = (y2 - y).abs().amax(dim=(0, 2))
    assert changed[7] > 1e-3
    # Other tokens may meet a different row count in their experts' matmuls; the per-row
    # arithmetic is the same, but allow for a BLAS that blocks by row count.
    assert torch.cat((changed[:7], changed[8:])).max() <= 1e-14


def routed(logits_per_token):
    """An MoE with D = E whose router is the identity, so token rows are the router logits."""
    logits = torch.tensor(logits_per_token, dtype=torch.float64)
    e = logits.shape[1]
    m = build(e, 2, d_model=e)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(e, dtype=torch.float64))
    m(logits[None])
    return m


def test_aux_loss_is_one_for_balanced_routing():
    # token j: logit 2 on expert j, 1 on expert j+1: every expert takes 2 of the 8 assignments
    # (f = 1/4) and, by symmetry, the mean probability is 1/4 for each.
    m = routed([[2.0 if e == j else 1.0 if e == (j + 1) % 4 else 0.0 for e in range(4)]
                for j in range(4)])
    torch.testing.assert_close(m.last_load, torch.full((4,), 0.25, dtype=torch.float64))
    assert abs(m.last_aux_loss.item() - 1.0) < 1e-12


def test_aux_loss_by_hand_when_every_token_picks_the_same_two_experts():
    m = routed([[3.0, 1.0, 0.0, 0.0]] * 5)
    z = math.exp(3) + math.exp(1) + 2
    p0, p1 = math.exp(3) / z, math.exp(1) / z
    # f = (1/2, 1/2, 0, 0), P = the one token's probabilities: 4 · (p0 + p1) / 2
    torch.testing.assert_close(m.last_load, torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))
    assert abs(m.last_aux_loss.item() - 2 * (p0 + p1)) < 1e-12


def test_aux_loss_is_one_under_a_uniform_router_and_its_gradient_reaches_the_router():
    m = build(8, 2)
    with torch.no_grad():
        m.router.weight.zero_()  # P_e = 1/8 exactly, so E · Σ f_e P_e = Σ f_e = 1
    m(randn(2, 9, 8))
    assert abs(m.last_aux_loss.item() - 1.0) < 1e-12
    m2 = build(8, 2)
    m2(randn(2, 9, 8))
    m2.last_aux_loss.backward()
    assert m2.router.weight.grad.abs().max() > 0
    assert all(p.grad is None for p in m2.experts.parameters())  # only P carries gradient
