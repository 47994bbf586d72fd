"""Causal linear attention: the chunked form against its per-token definition in float64
(1e-10: only the summation order differs), streaming, causality, and the backend choice."""

import pytest
import torch

from muse.layers.linear_attention import (
    CausalLinearAttention,
    elu_feature,
    linear_attention_chunked,
    linear_attention_naive,
    resolve_backend,
)

TOL = 1e-10


def qkv(n, b=2, h=3, dk=5, dv=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (elu_feature(torch.randn(b, h, n, dk, generator=g, dtype=torch.float64))
            for _ in range(2))
    return q, k, torch.randn(b, h, n, dv, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n, chunk", [(1, 4), (7, 4), (8, 4), (33, 8), (100, 64), (5, 64)],
                         ids=lambda x: str(x))
def test_chunked_equals_the_per_token_loop(n, chunk):
    q, k, v = qkv(n)
    want, (s_want, z_want) = linear_attention_naive(q, k, v)
    got, (s, z) = linear_attention_chunked(q, k, v, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    torch.testing.assert_close(s, s_want, rtol=1e-12, atol=TOL)
    torch.testing.assert_close(z, z_want, rtol=1e-12, atol=TOL)


def test_normaliser_makes_constant_values_pass_through():
    # y_t is a convex combination of v_{≤t}: equal values come out unchanged
    q, k, _ = qkv(40)
    v = torch.full((2, 3, 40, 4), 2.5, dtype=torch.float64)
    y, _ = linear_attention_chunked(q, k, v, chunk=16)
    torch.testing.assert_close(y, v, rtol=1e-5, atol=0)  # ε = 1e-6 in the denominator


def test_a_carried_state_continues_the_sequence_and_gradients_match():
    q, k, v = (t.requires_grad_() for t in qkv(50))
    whole, _ = linear_attention_chunked(q, k, v, chunk=8)
    first, state = linear_attention_chunked(q[:, :, :19], k[:, :, :19], v[:, :, :19], chunk=8)
    second, _ = linear_attention_chunked(q[:, :, 19:], k[:, :, 19:], v[:, :, 19:], state,
                                         chunk=8)
    torch.testing.assert_close(torch.cat((first, second), 2), whole, rtol=0, atol=TOL)
    naive, _ = linear_attention_naive(q[:, :, 19:], k[:, :, 19:], v[:, :, 19:], state)
    torch.testing.assert_close(second, naive, rtol=0, atol=TOL)
    w = torch.randn_like(whole)
    g_whole = torch.autograd.grad((whole * w).sum(), (q, k, v))
    g_parts = torch.autograd.grad((torch.cat((first, second), 2) * w).sum(), (q, k, v))
    for a, b in zip(g_parts, g_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_future_inputs_do_not_move_past_outputs():
    q, k, v = qkv(30)
    y, _ = linear_attention_chunked(q, k, v, chunk=8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 13:] += 1.0
    v2[:, :, 13:] -= 3.0
    y2, _ = linear_attention_chunked(q, k2, v2, chunk=8)
    assert torch.equal(y[:, :, :13], y2[:, :, :13])
    assert (y[:, :, 13:] - y2[:, :, 13:]).abs().max() > 1e-3


def test_bf16_inputs_keep_a_float32_state():
    q, k, v = (t.to(torch.bfloat16) for t in qkv(70))
    y, (s, z) = linear_attention_chunked(q, k, v, chunk=16)
    assert y.dtype == torch.bfloat16 and s.dtype == z.dtype == torch.float32
    want, _ = linear_attention_naive(*(t.double() for t in (q, k, v)))
    torch.testing.assert_close(y.double(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp16", "fp16-autocast"])
def test_fp16_inputs_whose_sums_pass_fp16s_range_stay_finite(autocast):
    # φ(q)·φ(k) ≈ 64·16² per pair: a chunk of 64 of them is ~1e6, past fp16's 65,504
    g = torch.Generator().manual_seed(0)
    q, k = (elu_feature(15 + torch.randn(1, 2, 256, 64, generator=g, dtype=torch.float64))
            for _ in range(2))
    v = torch.randn(1, 2, 256, 8, generator=g, dtype=torch.float64)
    half = [t.half().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        y, (s, z) = linear_attention_chunked(*half, chunk=64)
    assert y.dtype == torch.float16 and s.dtype == z.dtype == torch.float32
    want, _ = linear_attention_naive(*(t.detach().double() for t in half))
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-3)  # fp16's step near |v| ≈ 3
    y.float().square().sum().backward()
    assert all(t.grad.isfinite().all() for t in half)


def test_module_streams_exactly_with_conv_and_gate():
    torch.manual_seed(0)
    layer = CausalLinearAttention(d_model=16, n_heads=2, head_dim=8, chunk=8).double()
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    whole = layer(x)
    state = layer.init_state(2)
    a, state = layer(x[:, :11], state)
    b, state = layer(x[:, 11:], state)
    torch.testing.assert_close(torch.cat((a, b), 1), whole, rtol=0, atol=TOL)
    assert set(state) == {"s", "z", "conv"}
    assert layer.ran_backend == "torch" and "ran='torch'" in repr(layer)


def test_backend_choice_is_explicit():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    # fla only when asked for: its path has not been checked against this one on a GPU
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(RuntimeError, match="'fla'.*CUDA"):
        resolve_backend("fla", cpu)
    with pytest.raises(ValueError, match="auto.*got 'flash'"):
        resolve_backend("flash", cpu)
    layer = CausalLinearAttention(d_model=8, n_heads=1, head_dim=8, backend="fla")
    with pytest.raises(RuntimeError, match="'fla'"):
        layer(torch.randn(1, 3, 8))


def test_fla_missing_is_an_error_naming_the_package(monkeypatch):
    import muse.layers.linear_attention as la

    monkeypatch.setattr(la, "fla_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install flash-linear-attention"):
        la.resolve_backend("fla", torch.device("cuda"))
    # "auto" on CUDA without fla is the chunked form, and says so
    assert la.resolve_backend("auto", torch.device("cuda")) == "torch"
