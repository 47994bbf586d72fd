"""Causal linear attention: the chunked form against its per-token definition in float64
(1e-10: only the summation order differs), streaming, causality, and the backend choice."""

import pytest
import torch

from muse.layers.linear_attention import (
    CausalLinearAttention,
    decayed_linear_attention,
    elu_feature,
    linear_attention_chunked,
    linear_attention_naive,
    resolve_backend,
    state_with_normaliser,
    with_normaliser_column,
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


def streamed_and_whole(layer):
    """The layer's output over 37 tokens in one pass and in two streamed segments."""
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    whole = layer(x)
    state = layer.init_state(2)
    a, state = layer(x[:, :11], state)
    b, state = layer(x[:, 11:], state)
    return torch.cat((a, b), 1), whole, state


def test_module_streams_exactly_with_conv_and_gate():
    torch.manual_seed(0)
    layer = CausalLinearAttention(d_model=16, n_heads=2, head_dim=8, chunk=8).double()
    streamed, whole, state = streamed_and_whole(layer)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=TOL)
    assert set(state) == {"s", "z", "conv"}
    assert layer.ran_backend == "torch" and "ran='torch'" in repr(layer)


def log_decays(n, b=2, h=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(b, h, n, generator=g, dtype=torch.float64) * 0.3  # a_t in [0.74, 1]


@pytest.mark.parametrize("n, chunk", [(1, 4), (7, 4), (33, 8), (100, 64)], ids=lambda x: str(x))
def test_decayed_chunked_equals_the_per_token_loop_with_its_gradients(n, chunk):
    q, k, v = (t.requires_grad_() for t in qkv(n))
    a = log_decays(n).requires_grad_()
    want, (s_want, z_want) = linear_attention_naive(q, k, v, log_decay=a)
    got, (s, z) = decayed_linear_attention(q, k, v, a, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    torch.testing.assert_close(s, s_want, rtol=1e-12, atol=TOL)
    torch.testing.assert_close(z, z_want, rtol=1e-12, atol=TOL)
    w = torch.randn_like(want)
    g_want = torch.autograd.grad((want * w).sum() + s_want.sum() + z_want.sum(), (q, k, v, a))
    g_got = torch.autograd.grad((got * w).sum() + s.sum() + z.sum(), (q, k, v, a))
    for x, y in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-9)


def test_decayed_form_continues_a_carried_state_and_forgets_it():
    q, k, v = qkv(50)
    a = log_decays(50)
    whole, _ = decayed_linear_attention(q, k, v, a, chunk=8)
    first, state = decayed_linear_attention(q[:, :, :19], k[:, :, :19], v[:, :, :19],
                                            a[:, :, :19], chunk=8)
    second, _ = decayed_linear_attention(q[:, :, 19:], k[:, :, 19:], v[:, :, 19:],
                                         a[:, :, 19:], state, chunk=8)
    torch.testing.assert_close(torch.cat((first, second), 2), whole, rtol=0, atol=TOL)
    # without a decay the carried state would count as much as the chunk's own tokens
    fast = torch.full_like(a, -5.0)
    forgot, _ = decayed_linear_attention(q[:, :, 19:], k[:, :, 19:], v[:, :, 19:],
                                         fast[:, :, 19:], state, chunk=8)
    fresh, _ = decayed_linear_attention(q[:, :, 19:], k[:, :, 19:], v[:, :, 19:],
                                        fast[:, :, 19:], chunk=8)
    torch.testing.assert_close(forgot[:, :, 5:], fresh[:, :, 5:], rtol=0, atol=1e-8)


def test_zero_decay_is_plain_linear_attention():
    q, k, v = qkv(40)
    got, _ = decayed_linear_attention(q, k, v, torch.zeros(2, 3, 40, dtype=torch.float64),
                                      chunk=16)
    want, _ = linear_attention_chunked(q, k, v, chunk=16)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_module_with_a_decay_streams_exactly_and_starts_at_mamba2s_rates():
    torch.manual_seed(0)
    layer = CausalLinearAttention(d_model=16, n_heads=2, head_dim=8, chunk=8,
                                  decay="mamba2", dt_range=(1e-4, 0.1)).double()
    streamed, whole, _ = streamed_and_whole(layer)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=TOL)
    with torch.no_grad():
        layer.gamma.weight.zero_()
        x = torch.randn(1, 3, 16, dtype=torch.float64)
        rates = -layer.log_decay(x)[0, :, 0] / torch.exp(layer.a_log)
    torch.testing.assert_close(rates, torch.tensor([1e-4, 0.1], dtype=torch.float64))


def test_plain_heads_keep_everything_and_the_rest_decay_as_before():
    """Head 0 of 3 with plain_heads=1 never decays (log a = 0 exactly, where the decayed form is
    plain linear attention: the test above); heads 1 and 2 decay as without the option; the
    layer still streams exactly."""
    torch.manual_seed(0)
    kw = dict(d_model=16, n_heads=3, head_dim=8, chunk=8, decay="mamba2")
    mixed = CausalLinearAttention(plain_heads=1, **kw).double()
    decayed = CausalLinearAttention(**kw).double()
    decayed.load_state_dict(mixed.state_dict())
    x = torch.randn(2, 29, 16, dtype=torch.float64)
    log_a = mixed.log_decay(x)
    assert torch.equal(log_a[:, 0], torch.zeros_like(log_a[:, 0]))
    torch.testing.assert_close(log_a[:, 1:], decayed.log_decay(x)[:, 1:], rtol=0, atol=0)
    streamed, whole, _ = streamed_and_whole(mixed)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=TOL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay="gla"), "decay must be one of"),
    (dict(decay="mamba2", plain_heads=2), r"plain_heads must be in \[0, n_heads − 1 = 1\]"),
    (dict(plain_heads=1), "needs decay 'mamba2'"),
    (dict(decay="mamba2", dt_range=(0.1, 1e-3)), "dt_range must be 0 < low"),
])
def test_bad_decay_options_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLinearAttention(d_model=16, n_heads=2, head_dim=8, **kwargs)


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


def _without_recompute(monkeypatch):
    """The forms before the saved-activation cuts: the normaliser's division and the output
    gate by autograd op by op, every projection casting x itself."""
    import muse.layers.linear_attention as la
    import muse.layers.norm as norm

    monkeypatch.setattr(la, "checkpoint", lambda fn, *args, **_: fn(*args))
    monkeypatch.setattr(la, "gated_out", norm._gated_out)
    monkeypatch.setattr(la, "autocast_read", lambda t: t)


def _kept_bytes_and_grads(layer, x):
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    leaf = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(leaf * 1)  # not a leaf, as a LayerNorm's output: autocast caches no cast of it
    y.float().square().sum().backward()
    grads = [leaf.grad, *(p.grad for p in layer.parameters())]
    layer.zero_grad(set_to_none=True)
    return sum(n for p, n in kept.items() if p not in weights), y, grads


def test_the_cuts_keep_less_and_change_nothing_under_bf16_autocast(monkeypatch):
    """The decayed layer under bf16 autocast: output and every gradient bit for bit as the
    op-by-op forms give them, while backward keeps one bf16 copy of x instead of three, y not
    its float32 copy, and the gate's y, g instead of its float32 chain."""
    torch.manual_seed(0)
    layer = CausalLinearAttention(d_model=32, n_heads=2, head_dim=16, chunk=8, decay="mamba2")
    x = torch.randn(2, 40, 32)
    new_bytes, new_y, new_grads = _kept_bytes_and_grads(layer, x)
    _without_recompute(monkeypatch)
    old_bytes, old_y, old_grads = _kept_bytes_and_grads(layer, x)
    assert torch.equal(new_y, old_y)
    for a, b in zip(new_grads, old_grads, strict=True):
        assert torch.equal(a, b)
    per_token = (old_bytes - new_bytes) / (2 * 40)
    # two more bf16 copies of x (2·32·2); y's float32 copy and divisor for y in bf16 (2 heads ·
    # (17·4 + 4 − 17·2)); of the gate's float32 chain at least 2·32·4
    assert per_token >= 2 * 32 * 2 + 2 * (17 * 4 + 4 - 17 * 2) + 2 * 32 * 4, per_token


def test_recompute_keeps_less_with_the_same_values_and_gradients():
    """`recompute`: float64 outputs and gradients as without it, and under bf16 autocast
    backward keeps fewer bytes (the chunk products are formed again)."""
    torch.manual_seed(0)
    kw = dict(d_model=32, n_heads=2, head_dim=16, chunk=8, decay="mamba2")
    plain = CausalLinearAttention(**kw).double()
    again = CausalLinearAttention(recompute=True, **kw).double()
    again.load_state_dict(plain.state_dict())
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    runs = []
    for layer in (plain, again):
        leaf = x.clone().requires_grad_()
        layer(leaf).square().sum().backward()
        runs.append([leaf.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    kept = [_kept_bytes_and_grads(layer.float(), x.float())[0] for layer in (plain, again)]
    assert kept[1] < kept[0] * 0.8, kept


def test_the_fla_backend_hands_fla_its_layout_and_the_state(monkeypatch):
    """backend "fla" with fla's kernel stood in for by the chunked form in fla's (B, N, H, D)
    layout: the decayed form's outputs and final state, carried state and all, as backend
    "torch" gives them (the kernel itself is checked on CUDA, test_linear_attention_cuda.py)."""
    import muse.layers.linear_attention as la
    from muse.layers.hebbian import hebbian_chunked

    def stand_in(q, k, v, log_decay, state=None):
        y, w = hebbian_chunked(*(t.transpose(1, 2) for t in (q, k, v, log_decay)), state=state)
        return y.transpose(1, 2), w

    monkeypatch.setattr(la, "hebbian_fla", stand_in)
    q, k, v = qkv(45)
    log_decay = -torch.rand(2, 3, 45, dtype=torch.float64) * 0.2
    state = (torch.rand(2, 3, 5, 4, dtype=torch.float64), torch.rand(2, 3, 5, dtype=torch.float64))
    want = la.decayed_linear_attention(q, k, v, log_decay, state, chunk=64)
    got = la.decayed_linear_attention(q, k, v, log_decay, state, backend="fla")
    for a, b in zip((got[0], *got[1]), (want[0], *want[1]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("dv, width", [(64, 72), (7, 8), (8, 16), (15, 16)])
def test_the_normaliser_column_pads_rows_to_aligned_widths(dv, width):
    v = torch.randn(2, 3, 5, dv, dtype=torch.bfloat16)
    v1 = with_normaliser_column(v)
    assert v1.shape[-1] == width and torch.equal(v1[..., :dv], v)
    assert torch.all(v1[..., dv] == 1) and torch.all(v1[..., dv + 1:] == 0)
    s, z = torch.randn(2, 3, 4, dv), torch.randn(2, 3, 4)
    w = state_with_normaliser((s, z), width)
    assert torch.equal(w[..., :dv], s) and torch.equal(w[..., dv], z)
    assert torch.all(w[..., dv + 1:] == 0)


def test_the_feature_map_keeps_its_output_and_has_elus_gradient():
    """φ = elu + 1 as one node: its gradient is autograd's through elu (float64, both signs and
    0), and backward keeps φ(x) only, never x."""
    x = torch.tensor([-30.0, -2.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = elu_feature(x)
    assert len(kept) == 1 and torch.equal(kept[0], y)
    (g,) = torch.autograd.grad(y, x, torch.arange(1.0, 7.0, dtype=torch.float64))
    x2 = x.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(torch.nn.functional.elu(x2) + 1, x2,
                                  torch.arange(1.0, 7.0, dtype=torch.float64))
    # e^x against (e^x − 1) + 1, φ's own value: one float64 rounding of a number near 1 apart
    torch.testing.assert_close(g, want, rtol=1e-14, atol=1e-15)
    assert torch.autograd.gradcheck(elu_feature, (x[1:3].detach().clone().requires_grad_(),))
