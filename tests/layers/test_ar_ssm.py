"""AR-SSM (`muse/layers/ar_ssm.py`): the parallel scan against a naive per-token float64 loop,
causality of the whole layer and of its conv, gradients, λ's range, streaming, gating options
and rank warm-up."""

from __future__ import annotations

import pytest
import torch

from muse.layers.ar_ssm import ARSSM

D, R = 12, 5


def make(seed: int = 0, **kwargs) -> ARSSM:
    torch.manual_seed(seed)
    kwargs = {"d_model": D, "rank": R} | kwargs
    return ARSSM(**kwargs).double()


def naive(layer: ARSSM, x: torch.Tensor) -> torch.Tensor:
    """The recurrence one token at a time, straight from the definition."""
    batch, n, _ = x.shape
    k = layer.kernel_size
    weight, bias = layer.conv.weight[:, 0], layer.conv.bias  # (D, K), (D,)
    lam = torch.exp(-torch.nn.functional.softplus(layer.decay_logit))
    s = torch.zeros(batch, layer.rank, dtype=x.dtype)
    out = []
    for t in range(n):
        local = bias.expand(batch, -1).clone()
        for j in range(k):  # tap j reads x_{t−(k−1)+j}
            src = t - (k - 1) + j
            if src >= 0:
                local = local + weight[:, j] * x[:, src]
        g = torch.sigmoid(layer.gate(x[:, t])) if layer.gate is not None else 1.0
        u = layer.proj_u(x[:, t]) * g
        w = layer.proj_w(x[:, t]) * g
        s = lam * s + u
        read = s * w
        if layer.out_norm:  # divided by its RMS over the rank
            read = read / read.pow(2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()
        out.append(local + layer.proj_out(read))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 129])
@pytest.mark.parametrize(
    "options",
    [{}, {"soft_gating": False}, {"gate_hidden": 7}, {"kernel_size": 1}, {"kernel_size": 4}],
    ids=["gated", "ungated", "mlp-gate", "k1", "k4"],
)
def test_parallel_equals_naive_loop_float64(n, options):
    layer = make(**options)
    x = torch.randn(2, n, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive(layer, x), rtol=0, atol=1e-12)


def test_ungated_has_no_gate_parameters():
    assert make(soft_gating=False).gate is None
    assert make(soft_gating=False).num_params() < make().num_params()


@pytest.mark.parametrize("t", [0, 5, 30, 62])
def test_causal_future_perturbation_leaves_past_bit_identical(t):
    layer = make()
    x = torch.randn(2, 64, D, dtype=torch.float64)
    x2 = x.clone()
    x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
    y, y2 = layer(x), layer(x2)
    assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
    assert not torch.equal(y[:, t + 1 :], y2[:, t + 1 :])


def test_conv_is_causal_left_padded():
    """With the state path off (W_o = 0) y is the conv alone: an impulse at t0 must reach
    y_{t0..t0+K−1} and nothing before t0. Symmetric padding would move y_{t0−1}."""
    layer = make(kernel_size=3)
    with torch.no_grad():
        layer.proj_out.weight.zero_()
        layer.conv.weight.fill_(1.0)
    x = torch.zeros(1, 10, D, dtype=torch.float64)
    x2 = x.clone()
    t0 = 4
    x2[0, t0] = 1.0
    changed = (layer(x2) - layer(x)).abs().amax(dim=-1)[0]
    assert changed[:t0].eq(0).all()
    assert changed[t0 : t0 + 3].gt(0).all()
    assert changed[t0 + 3 :].eq(0).all()


def test_decay_in_unit_interval_and_near_one_at_init():
    layer = make(rank=64)
    lam = layer.decay()
    assert (lam > 0).all() and (lam <= 1).all()
    assert lam.min() >= 0.9 - 1e-6 and lam.max() <= 0.999 + 1e-6  # float32 init
    with torch.no_grad():
        layer.decay_logit.copy_(torch.linspace(-200, 200, 64))
    lam = layer.decay()
    assert (lam > 0).all() and (lam <= 1).all()


def test_gradient_reaches_every_parameter():
    layer = make(gate_hidden=6)
    x = torch.randn(2, 33, D, dtype=torch.float64)
    (layer(x) * torch.randn(2, 33, D, dtype=torch.float64)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_long_range_gradient_last_output_to_first_input():
    layer = make()
    n = 1024
    x = torch.randn(1, n, D, dtype=torch.float64, requires_grad=True)
    layer(x)[0, -1].sum().backward()
    grad0 = x.grad[0, 0].norm()
    assert torch.isfinite(grad0) and grad0 > 1e-6, grad0


@pytest.mark.parametrize("split", [1, 2, 5, 30])
@pytest.mark.parametrize("kernel_size", [1, 3, 4])
def test_streaming_two_segments_equal_one_run(split, kernel_size):
    layer = make(kernel_size=kernel_size)
    x = torch.randn(3, 32, D, dtype=torch.float64)
    full = layer(x)
    state = layer.init_state(3)
    assert state["conv"].shape == (3, kernel_size - 1, D) and state["ssm"].shape == (3, R)
    y1, state = layer(x[:, :split], state)
    y2, state = layer(x[:, split:], state)
    torch.testing.assert_close(torch.cat((y1, y2), dim=1), full, rtol=0, atol=1e-12)
    # Three segments, the middle one shorter than the conv's memory.
    ys = []
    state = layer.init_state(3)
    for a, b in ((0, split), (split, split + 1), (split + 1, 32)):
        y, state = layer(x[:, a:b], state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=1), full, rtol=0, atol=1e-12)


def test_plain_forward_starts_fresh():
    layer = make()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    _, state = layer(x, layer.init_state(2))
    assert torch.equal(layer(x), layer(x))
    assert not torch.equal(layer(x, state)[0], layer(x))


def test_rank_warmup_masks_components_while_active_rank_grows():
    steps = 8
    layer = make(rank=R, rank_warmup_steps=steps)
    x = torch.randn(2, 17, D, dtype=torch.float64)
    layer.train()

    # Step 0: active rank 1. Masked components contribute nothing and get no gradient.
    y = layer(x)
    (y * torch.randn_like(y)).sum().backward()
    assert int(layer.warmup_step) == 1
    assert layer.proj_u.weight.grad[1:].eq(0).all() and layer.proj_u.weight.grad[0].ne(0).any()
    assert layer.proj_w.weight.grad[1:].eq(0).all()
    assert layer.proj_out.weight.grad[:, 1:].eq(0).all()
    assert layer.gate.weight.grad[1:].eq(0).all()
    assert layer.decay_logit.grad[1:].eq(0).all() and layer.decay_logit.grad[0].ne(0)
    layer.warmup_step.zero_()
    with torch.no_grad():
        layer.proj_u.weight[1:] += 1.0
        layer.proj_out.weight[:, 1:] += 1.0
        torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-12)

    # Active rank 1 + ⌊(r−1)·step/steps⌋: reaches r at step = steps and stays there.
    expected = [1 + (R - 1) * min(s, steps) // steps for s in range(steps + 3)]
    layer.warmup_step.zero_()
    seen = []
    for _ in range(steps + 3):
        mask = layer._rank_mask()
        seen.append(int(mask.sum()))
        assert mask[: seen[-1]].all()
    assert seen == expected and seen[-1] == R

    # Eval mode: no mask, no counting.
    layer.eval()
    layer.warmup_step.zero_()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive(layer, x), rtol=0, atol=1e-12)
    assert int(layer.warmup_step) == 0


def test_rank_warmup_off_by_default_and_training_mode_matches_eval():
    layer = make()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    layer.train()
    y_train = layer(x)
    layer.eval()
    assert torch.equal(y_train, layer(x))
    assert int(layer.warmup_step) == 0


def test_float32_forward_backward_finite():
    torch.manual_seed(0)
    layer = ARSSM(d_model=D, rank=R)
    x = torch.randn(2, 300, D, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()


def test_under_bf16_autocast_backward_keeps_one_copy_of_the_input():
    """The conv pads inside itself (no F.pad copy), and the conv and the gate, u and w projections
    read one autocast copy of x (layers.cast): backward keeps one bf16 (B, N, D) tensor of x,
    where it kept four (the padded copy and a cast for each projection)."""
    torch.manual_seed(0)
    layer = ARSSM(d_model=D, rank=R)  # float32 weights, as trained under autocast
    bsz, n = 2, 40
    leaf = torch.randn(bsz, n, D, requires_grad=True)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        layer(leaf * 1)  # a layer's output, as the block's normed input is
    sizes = {bsz * n * D * 2, bsz * (n + 2) * D * 2}  # x, or x padded for the conv
    assert [b for b, dt in kept.values() if dt == torch.bfloat16 and b in sizes] == [
        bsz * n * D * 2]
