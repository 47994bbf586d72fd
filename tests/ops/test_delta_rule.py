"""The gated delta rule: the chunked form against the per-token definition in float64."""

import pytest
import torch
import torch.nn.functional as F

from muse.ops.delta_rule import delta_rule_chunked, delta_rule_naive


def inputs(n, seed=0, b=2, h=3, dk=4, dv=5):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    q = torch.randn(b, h, n, dk, **f64)
    k = F.normalize(torch.randn(b, h, n, dk, **f64), dim=-1)
    v = torch.randn(b, h, n, dv, **f64)
    log_decay = -torch.rand(b, h, n, **f64) * 0.5
    beta = torch.rand(b, h, n, **f64)
    return q, k, v, log_decay, beta


@pytest.mark.parametrize("n", [1, 5, 16, 17, 100])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_chunked_equals_the_per_token_definition(n, chunk):
    args = inputs(n, seed=n + chunk)
    state = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y1, w1 = delta_rule_naive(*args, state=state)
    y2, w2 = delta_rule_chunked(*args, state=state, chunk=chunk)
    # float64, ≤ 100 steps of contractions: agreement to ~1e-14
    assert torch.allclose(y1, y2, rtol=1e-10, atol=1e-10)
    assert torch.allclose(w1, w2, rtol=1e-10, atol=1e-10)


def test_a_key_written_twice_holds_the_last_value():
    # β = 1, no decay: the second write under k replaces the first, it does not add to it
    k = F.normalize(torch.randn(1, 1, 1, 4, dtype=torch.float64), dim=-1).expand(1, 1, 2, 4)
    v = torch.tensor([[[[1.0, 2.0], [5.0, -1.0]]]], dtype=torch.float64)
    zeros = torch.zeros(1, 1, 2, dtype=torch.float64)
    y, _ = delta_rule_chunked(k, k, v, zeros, zeros + 1.0, chunk=2)
    assert torch.allclose(y[0, 0, 1], v[0, 0, 1], atol=1e-12)


def test_two_segments_with_the_carried_state_equal_one_run():
    q, k, v, ld, beta = inputs(50)
    y, w = delta_rule_chunked(q, k, v, ld, beta, chunk=8)
    cut = [t[:, :, :23] for t in (q, k, v, ld, beta)]
    rest = [t[:, :, 23:] for t in (q, k, v, ld, beta)]
    ya, wa = delta_rule_chunked(*cut, chunk=8)
    yb, wb = delta_rule_chunked(*rest, state=wa, chunk=8)
    assert torch.allclose(torch.cat((ya, yb), dim=2), y, rtol=1e-12, atol=1e-12)
    assert torch.allclose(wb, w, rtol=1e-12, atol=1e-12)


def test_half_precision_inputs_are_solved_in_float32():
    args = [t.to(torch.bfloat16) for t in inputs(40)]
    y, w = delta_rule_chunked(*args, chunk=16)
    ref, _ = delta_rule_naive(*(t.double() for t in args))
    assert y.dtype == w.dtype == torch.float32
    assert (y.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("n, chunk", [(17, 4), (64, 16)])
def test_chunked_gradients_equal_the_per_token_definition(n, chunk):
    args = [x.requires_grad_() for x in inputs(n, seed=7)]
    state = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, n, 5, dtype=torch.float64)

    def grads(fn, **kw):
        y, w = fn(*args, state=state, **kw)
        return torch.autograd.grad((y * weights).sum() + w.square().sum(), [*args, state])

    for a, b in zip(grads(delta_rule_naive), grads(delta_rule_chunked, chunk=chunk), strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


def test_the_backward_of_the_chunk_loop_selects_no_chunk():
    # a per-chunk index (step[:, c]) backpropagates as a full-size zero tensor per chunk: M of
    # them make the backward O(M²); unbind's backward is one stack
    from torch.profiler import ProfilerActivity, profile

    def selections(n):
        args = [x.requires_grad_() for x in inputs(n, seed=3)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y, _ = delta_rule_chunked(*args, chunk=4)
            y.sum().backward()
        return sum(e.count for e in prof.key_averages() if e.key == "aten::select_backward")

    assert selections(16) == selections(64)  # 4 chunks and 16: none per chunk
