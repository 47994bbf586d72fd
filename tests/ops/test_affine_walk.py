"""The two-level walk of the delta rule's chunk steps (muse.ops.affine_walk) against the loop, in
float64: the same sums in another order, so equal to 1e-12 of the largest value."""

import pytest
import torch

from muse.ops.affine_walk import affine_walk, sequential_walk


def walk_inputs(m, seed=0, seqs=3, dk=8, dv=5):
    torch.manual_seed(seed)
    return (torch.randn(seqs, m, dk, dk, dtype=torch.float64) / 3,
            torch.randn(seqs, m, dk, dv, dtype=torch.float64),
            torch.randn(seqs, dk, dv, dtype=torch.float64))


@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 100])
@pytest.mark.parametrize("group", [None, 1, 4, 7, 200])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_equals_the_loop(m, group, reverse):
    args = walk_inputs(m, seed=m)
    got = affine_walk(*args, reverse=reverse, group=group)
    want = sequential_walk(*args, reverse=reverse)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert float((g - w).abs().max() / w.abs().max()) < 1e-12


def test_the_loop_is_its_definition():
    step, push, w = walk_inputs(3)
    entering, last = sequential_walk(step, push, w)
    assert torch.equal(entering[:, 0], w)
    for c in range(3):
        w = step[:, c] @ w + push[:, c]
        if c < 2:
            assert torch.allclose(entering[:, c + 1], w, rtol=0, atol=1e-13)
    assert torch.allclose(last, w, rtol=0, atol=1e-13)


def test_the_delta_rule_takes_either_walk_with_the_same_gradients(monkeypatch):
    from muse.ops import delta_rule

    from .test_delta_rule import inputs

    runs, start = [], torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for walk in (sequential_walk, affine_walk):
        monkeypatch.setattr(delta_rule, "_walk", walk)
        args = [x.requires_grad_() for x in inputs(200, seed=3)]
        state = start.clone().requires_grad_()
        y, w = delta_rule.delta_rule_chunked(*args, state=state, chunk=8)
        grads = torch.autograd.grad(y.square().sum() + w.sum(), [*args, state])
        runs.append([y, w, *grads])
    for a, b in zip(*runs, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", ["step", "w", "group"])
def test_bad_shapes_and_groups_are_named(bad):
    step, push, w = walk_inputs(4)
    kwargs = {}
    if bad == "step":
        step = step[..., :3]
    elif bad == "w":
        w = w[:2]
    else:
        kwargs["group"] = 0
    with pytest.raises(ValueError, match="group must be ≥ 1, got 0" if bad == "group"
                       else r"affine_walk needs step \(S, M, Dk, Dk\)"):
        affine_walk(step, push, w, **kwargs)
