"""Dissipative Hebbian: the chunked form against the per-token definition in float64."""

import math

import pytest
import torch

from muse.layers.hebbian import DissipativeHebbian, hebbian_chunked, hebbian_naive, intra_chunk

from .saved import saved_storages


def inputs(n, seed=0, b=2, h=3, dk=4, dv=5):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    q, k = torch.randn(b, h, n, dk, **f64), torch.randn(b, h, n, dk, **f64)
    v = torch.randn(b, h, n, dv, **f64)
    log_decay = -torch.rand(b, h, n, **f64) * 0.5
    return q, k, v, log_decay


@pytest.mark.parametrize("n", [1, 5, 16, 17, 100])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_chunked_equals_the_per_token_definition(n, chunk):
    q, k, v, ld = inputs(n, seed=n + chunk)
    state = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y1, w1 = hebbian_naive(q, k, v, ld, eta=0.7, state=state)
    y2, w2 = hebbian_chunked(q, k, v, ld, eta=0.7, state=state, chunk=chunk)
    # float64 sums of ≤ 100 products of unit size: agreement to ~1e-14
    assert torch.allclose(y1, y2, rtol=1e-10, atol=1e-10)
    assert torch.allclose(w1, w2, rtol=1e-10, atol=1e-10)


def test_two_segments_with_the_carried_state_equal_one_run():
    q, k, v, ld = inputs(50)
    y, w = hebbian_chunked(q, k, v, ld, chunk=8)
    ya, wa = hebbian_chunked(q[:, :, :23], k[:, :, :23], v[:, :, :23], ld[..., :23], chunk=8)
    yb, wb = hebbian_chunked(q[:, :, 23:], k[:, :, 23:], v[:, :, 23:], ld[..., 23:], state=wa,
                             chunk=8)
    assert torch.allclose(torch.cat((ya, yb), dim=2), y, rtol=1e-12, atol=1e-12)
    assert torch.allclose(wb, w, rtol=1e-12, atol=1e-12)


def test_decoding_token_by_token_equals_one_run():
    # one token takes the recurrent step, not a chunk padded to T: the same values and state
    q, k, v, ld = inputs(12)
    y, w = hebbian_chunked(q, k, v, ld, eta=0.7, chunk=8)
    state, ys = None, []
    for t in range(12):
        y_t, state = hebbian_chunked(*(x[:, :, t:t + 1] for x in (q, k, v)), ld[..., t:t + 1],
                                     eta=0.7, state=state, chunk=8)
        ys.append(y_t)
    assert torch.allclose(torch.cat(ys, dim=2), y, rtol=1e-12, atol=1e-12)
    assert torch.allclose(state, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 20])
def test_bf16_inputs_give_bf16_values_and_a_float32_state(n):
    q, k, v, ld = inputs(n)
    y, w = hebbian_chunked(*(t.bfloat16() for t in (q, k, v)), ld.float(), chunk=8)
    ref, ref_w = hebbian_naive(q, k, v, ld)
    assert (y.dtype, w.dtype) == (torch.bfloat16, torch.float32)
    # bf16 inputs and products (8 bits of mantissa, 2⁻⁸ ≈ 4e-3): within 2e-2 of the largest
    # value of the float64 definition
    for got, want in ((y, ref), (w, ref_w)):
        assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()


def test_strong_decay_stays_finite():
    q, k, v, ld = inputs(300)
    y, _ = hebbian_chunked(q, k, v, ld * 200.0, chunk=64)  # e^{-100} per step
    assert torch.isfinite(y).all()


def test_layer_state_carries_across_segments():
    torch.manual_seed(1)
    m = DissipativeHebbian(d_model=16, n_heads=2, head_dim=8, chunk=8, backend="torch").double()
    x = torch.randn(2, 45, 16, dtype=torch.float64)
    y, w = m(x, return_state=True)
    ya, wa = m(x[:, :20], return_state=True)
    yb, wb = m(x[:, 20:], state=wa, return_state=True)
    assert torch.allclose(torch.cat((ya, yb), dim=1), y, rtol=1e-12, atol=1e-12)
    assert torch.allclose(wb, w, rtol=1e-12, atol=1e-12)


def test_bad_backend_is_named():
    with pytest.raises(ValueError, match="auto.*'cuda-magic'"):
        DissipativeHebbian(d_model=8, n_heads=1, head_dim=8, backend="cuda-magic")
    m = DissipativeHebbian(d_model=8, n_heads=1, head_dim=8, backend="fla")
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        m(torch.randn(1, 4, 8))


def test_bf16_autocast_keeps_the_state_in_float32():
    torch.manual_seed(2)
    m = DissipativeHebbian(d_model=16, n_heads=2, head_dim=8, chunk=8, backend="torch")
    x = torch.randn(1, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, w = m(x, return_state=True)
    assert w.dtype == torch.float32
    y32 = m(x)
    # bf16 products (8 bits of mantissa) against float32: agreement to a few percent
    assert torch.allclose(y.float(), y32, rtol=5e-2, atol=5e-2)


def test_gamma_offset_and_eta_scale_enter_the_recurrence_per_head():
    """Γ_t + ΔΓ_h and η·s_h, per batch row and head, against the per-token definition run with
    those values written in (float64, tolerance 1e-12)."""
    torch.manual_seed(3)
    m = DissipativeHebbian(d_model=16, n_heads=2, head_dim=8, chunk=8, eta=0.7, dt=0.5,
                           backend="torch").double()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    offset = torch.tensor([[0.0, 0.3], [0.1, 0.0]], dtype=torch.float64)
    scale = torch.tensor([[1.0, 0.5], [0.25, 0.9]], dtype=torch.float64)
    y, w = m(x, return_state=True, gamma_offset=offset, eta_scale=scale)

    q, k, v = m.qkv(x).view(2, 21, 3, 2, 8).unbind(2)
    k = torch.nn.functional.normalize(k, dim=-1) * scale[:, None, :, None]
    log_decay = -(torch.nn.functional.softplus(m.gamma(x)) + offset[:, None]) * 0.5
    heads_first = (t.transpose(1, 2) for t in (q, k, v))
    y_ref, w_ref = hebbian_naive(*heads_first, log_decay.transpose(1, 2), eta=0.7)
    y_ref = y_ref.transpose(1, 2)
    y_ref = y_ref / y_ref.pow(2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()  # per-head RMS
    y_ref = m.out(y_ref.reshape(2, 21, -1))
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    assert torch.allclose(w, w_ref, rtol=0, atol=1e-12)
    assert not torch.allclose(y, m(x), atol=1e-3)


def test_half_precision_weights_without_autocast():
    """How the harness serves a model (weights cast to fp16/bf16, no autocast): the wide
    decays must not leak into the half-precision products."""
    torch.manual_seed(3)
    m = DissipativeHebbian(d_model=16, n_heads=2, head_dim=8, chunk=8, backend="torch")
    x = torch.randn(1, 30, 16)
    y32 = m(x)
    y16 = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), y32, rtol=5e-2, atol=5e-2)  # bf16: 8 bits of mantissa


READOUT = dict(conv=4, qk_norm="l2", decay="mamba2", out_gate=True, local_window=8)


@pytest.mark.parametrize("options", [{}, READOUT, {**READOUT, "delta": True}],
                         ids=["plain", "read-out", "delta"])
def test_layer_is_causal_and_every_parameter_learns(options):
    torch.manual_seed(0)
    m = DissipativeHebbian(d_model=16, n_heads=2, head_dim=8, chunk=8, **options).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    x2 = x.detach().clone()
    x2[:, 25:] += 1.0
    assert torch.equal(m(x2)[:, :25], y[:, :25].detach())
    y[:, -1].sum().backward()
    # no detach through time: the first token is reached, past the 8-token window too
    assert x.grad[:, 0].abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("dt_range", [None, (1e-5, 0.1)])
def test_mamba2_decay_starts_spread_from_slow_to_fast(dt_range):
    extra = {} if dt_range is None else {"dt_range": dt_range}
    m = DissipativeHebbian(d_model=16, n_heads=4, head_dim=8, decay="mamba2", **extra)
    with torch.no_grad():
        per_step = torch.exp(m.log_decay(torch.zeros(1, 1, 16)))[0, 0]
    # A·softplus(b): 1·low on the first head, 16·high on the last
    low, high = dt_range or (1e-3, 0.1)
    want = torch.exp(-torch.tensor([low, 16 * high]))
    assert torch.allclose(per_step[[0, -1]], want, rtol=1e-5)
    assert (per_step.diff() < 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay="exp"), "decay must be one of"),
    (dict(qk_norm="q"), "qk_norm must be one of"),
    (dict(conv=-1), "conv and local_window must be ≥ 0"),
    (dict(decay="mamba2", dt_range=(0.1, 1e-3)), "dt_range must be 0 < low ≤ high"),
])
def test_bad_read_out_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DissipativeHebbian(d_model=16, n_heads=2, head_dim=8, **kwargs)


def test_delta_rule_needs_a_write_strength_at_most_one():
    with pytest.raises(ValueError, match="the delta rule needs 0 < eta ≤ 1"):
        DissipativeHebbian(d_model=16, n_heads=2, head_dim=8, delta=True, eta=2.0)


@pytest.mark.parametrize("carried", [False, True])
def test_plain_heads_write_without_erasing_and_the_rest_run_the_delta_rule(carried):
    """plain_heads h: heads < h follow the plain rule W = αW + η v kᵀ, heads ≥ h the delta rule,
    each against its per-token loop in float64, with and without a carried W."""
    from muse.ops.delta_rule import delta_rule_naive

    torch.manual_seed(0)
    m = DissipativeHebbian(d_model=16, n_heads=3, head_dim=4, delta=True, eta=0.7,
                           plain_heads=1, chunk=4).double()
    bsz, n = 2, 11
    q, k, v = (torch.randn(bsz, n, 3, 4, dtype=torch.float64) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    log_decay = -torch.rand(bsz, n, 3, dtype=torch.float64) * 0.2
    beta = torch.rand(bsz, n, 3, dtype=torch.float64) * 0.7
    state = torch.randn(bsz, 3, 4, 4, dtype=torch.float64) if carried else None
    y, w = m._delta(q, k, v, log_decay, beta, state, None)
    qh, kh, vh, ld, bh = (t.transpose(1, 2) for t in (q, k, v, log_decay, beta))
    y0, w0 = hebbian_naive(qh[:, :1], kh[:, :1], vh[:, :1], ld[:, :1], 0.7,
                           None if state is None else state[:, :1])
    y1, w1 = delta_rule_naive(qh[:, 1:], kh[:, 1:], vh[:, 1:], ld[:, 1:], bh[:, 1:],
                              None if state is None else state[:, 1:])
    torch.testing.assert_close(y, torch.cat((y0, y1), dim=1).transpose(1, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(w, torch.cat((w0, w1), dim=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(plain_heads=2, delta=True), dict(plain_heads=-1),
                                    dict(plain_heads=-1, delta=True)])
def test_plain_heads_are_some_heads_of_a_delta_rule_layer(kwargs):
    with pytest.raises(ValueError, match="plain_heads must be in"):
        DissipativeHebbian(d_model=16, n_heads=2, head_dim=8, **kwargs)


def test_decay_diagnostics_report_the_heads_of_the_last_forward():
    from muse.layers.hebbian import decay_diagnostics

    m = DissipativeHebbian(d_model=16, n_heads=4, head_dim=8, decay="mamba2")
    assert decay_diagnostics(m) == {}
    with torch.no_grad():
        m(torch.zeros(1, 3, 16))
    d = decay_diagnostics(m)
    assert d["decay_min"] == pytest.approx(math.exp(-1.6), rel=1e-5)
    assert d["decay_max"] == pytest.approx(math.exp(-1e-3), rel=1e-5)


def test_the_backward_of_the_cpu_chunk_loop_selects_no_chunk():
    # a per-chunk index backpropagates as a full-size zero tensor per chunk: O(M²) over M chunks
    from torch.profiler import ProfilerActivity, profile

    def selections(n):
        q, k, v, ld = (x.requires_grad_() for x in inputs(n, seed=3))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y, _ = hebbian_chunked(q, k, v, ld, chunk=4)
            y.sum().backward()
        return sum(e.count for e in prof.key_averages() if e.key == "aten::select_backward")

    assert selections(16) == selections(64)


def _phase2_layer(dtype=torch.float32):
    """A small layer with phase2's default read-out (conv 4, unit q and k, mamba2 decay, the
    output gate and norm, the delta rule with one plain head)."""
    torch.manual_seed(5)
    return DissipativeHebbian(d_model=16, n_heads=3, head_dim=8, chunk=8, conv=4, qk_norm="l2",
                              decay="mamba2", out_gate=True, delta=True,
                              plain_heads=1).to(dtype)


def _previous_form(monkeypatch):
    """The layer as composed before its saved-activation cuts: every projection casts x itself,
    the output gate and the conv + SiLU by autograd op by op, the plain heads' q, k, v handed
    over as strided head slices (the delta rule's own cuts: tests/ops/test_delta_rule.py)."""
    import muse.layers.hebbian as hebbian
    import muse.layers.norm as norm
    import muse.layers.short_conv as short_conv

    monkeypatch.setattr(hebbian, "autocast_read", lambda t: t)
    monkeypatch.setattr(hebbian, "gated_out", norm._gated_out)
    monkeypatch.setattr(short_conv, "conv_silu", short_conv._conv_silu)
    monkeypatch.setattr(hebbian, "_contiguous", lambda t: t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_layer_equals_its_previous_form(dtype, monkeypatch):
    """Output and the gradients of x and of every parameter bit for bit as the previous form:
    in float64, and under bf16 autocast (float32 weights and x, as in training)."""
    g = torch.Generator().manual_seed(6)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    x0 = torch.randn(2, 21, 16, generator=g, dtype=wide)
    up = torch.randn(2, 21, 16, generator=g, dtype=torch.float64)
    runs = []
    for previous in (False, True):
        if previous:
            _previous_form(monkeypatch)
        m = _phase2_layer(wide)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float64):
            y = m(x * 1)  # a non-leaf, as the LayerNorm's output is
        (y.double() * up).sum().backward()
        runs.append([y, x.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*runs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_projections_keep_one_bf16_copy_of_x(monkeypatch):
    """qkv, β, Γ and the gate read x: under autocast backward keeps one bf16 copy of it, not
    one a projection (the previous form kept four)."""
    x = torch.randn(1, 24, 16).requires_grad_()
    copy = x.detach().to(torch.bfloat16)

    def copies():
        kept = saved_storages(_phase2_layer(), x * 1)
        return sum(t.dtype == torch.bfloat16 and t.numel() == x.numel()
                   and torch.equal(t.reshape(x.shape), copy) for t in kept)

    assert copies() == 1
    _previous_form(monkeypatch)
    assert copies() == 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_one_node_output_gate_equals_the_composition(dtype):
    """gated_out against autograd through rms_normalize · gain · SiLU(g): output, ∂y, ∂gain,
    ∂g bit for bit, in float64 and under bf16 autocast (y, g in bf16, the gain float32)."""
    from muse.layers.norm import _gated_out, gated_out

    g_ = torch.Generator().manual_seed(7)
    y0 = torch.randn(2, 9, 3, 8, generator=g_, dtype=torch.float64).to(dtype) * 5
    g0 = torch.randn(2, 9, 24, generator=g_, dtype=torch.float64).to(dtype)
    gain0 = 1 + torch.randn(8, generator=g_, dtype=torch.float64) / 4
    gain0 = gain0 if dtype == torch.float64 else gain0.float()
    up = torch.randn(2, 9, 24, generator=g_, dtype=torch.float64)
    runs = []
    for fn in (gated_out, _gated_out):
        leaves = [t.clone().requires_grad_() for t in (y0, gain0, g0)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float64):
            out = fn(*leaves)
        (out.double() * up).sum().backward()
        runs.append([out, *(t.grad for t in leaves)])
    for a, b in zip(*runs, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_the_output_gate_keeps_y_the_gain_and_g_only():
    """Per token and head of D_h = 8 in bf16: y (16 bytes) and g (16), not also y's float32
    copy (32), the normed y (16), the float32 product with the gain (32) and SiLU(g) (16)."""
    from muse.layers.norm import _gated_out, gated_out

    y = torch.randn(1, 10, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, 10, 24, dtype=torch.bfloat16, requires_grad=True)
    gain = torch.ones(8, requires_grad=True)

    def per_token(fn):  # the gain (32 bytes) is a weight: left out
        kept = saved_storages(fn, y, gain, g)
        return (sum(t.untyped_storage().nbytes() for t in kept) - 32) / 10

    assert per_token(gated_out) == 3 * 16 * 2
    assert per_token(_gated_out) > 3 * (16 * 2 + 32 * 2 + 16)


def test_the_plain_heads_keep_no_copies_of_q_k_v_of_their_own(monkeypatch):
    """bf16 autocast, the plain head (D_h = 8): its q, k, v go to the chunked form laid out
    once; as strided head slices, the batched products reading them made (and autograd kept)
    contiguous copies of their own, three (N × D_h) bf16 copies more (3 · 8 · 2 bytes a
    token)."""
    import muse.layers.hebbian as hebbian

    x = torch.randn(1, 64, 16).requires_grad_()

    def per_token():
        kept = saved_storages(_phase2_layer(), x * 1)
        return sum(t.untyped_storage().nbytes() for t in kept) / 64

    now = per_token()
    monkeypatch.setattr(hebbian, "_contiguous", lambda t: t)
    assert per_token() - now == 3 * 8 * 2


def test_the_delta_rule_keeps_v_as_the_projections_hold_it(monkeypatch):
    """bf16 autocast: the delta heads' v is kept as the bf16 view of the projections (their
    storage is kept by the q, k norms anyway), not as a float32 copy: N · 2 heads · 8 · 4
    bytes fewer than with v handed over in float32."""
    import muse.layers.hebbian as hebbian

    x = torch.randn(1, 64, 16).requires_grad_()

    def total():
        return sum(t.untyped_storage().nbytes() for t in saved_storages(_phase2_layer(), x * 1))

    now = total()
    rule = hebbian.delta_rule_chunked
    monkeypatch.setattr(hebbian, "delta_rule_chunked", lambda q, k, v, *a, **kw: rule(
        q, k, v.to(torch.float32, memory_format=torch.contiguous_format), *a, **kw))
    assert total() - now == 64 * 2 * 8 * 4


@pytest.mark.parametrize("n, chunk", [(17, 4), (64, 16), (100, 64)])
def test_chunked_gradients_equal_the_per_token_definitions(n, chunk):
    """∂q, ∂k, ∂v, ∂log-decay and ∂state of the chunked form (its intra-chunk backward written
    out, the rest by autograd) against autograd through the per-token loop, float64."""
    grads = []
    for fn in (hebbian_naive, lambda *a, **kw: hebbian_chunked(*a, **kw, chunk=chunk)):
        q, k, v, ld = (x.requires_grad_() for x in inputs(n, seed=n))
        state = torch.randn(2, 3, 4, 5, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(1)).requires_grad_()
        up = torch.randn(2, 3, n, 5, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
        y, w = fn(q, k, v, ld, eta=0.7, state=state)
        ((y * up).sum() + w.square().sum()).backward()
        grads.append([t.grad for t in (q, k, v, ld, state)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def _intra_composed(qc, kc, vc, b):
    """The intra-chunk products by autograd, op by op (the form that kept its T × T products)."""
    chunk = b.shape[-1]
    above = torch.ones(chunk, chunk, dtype=torch.bool).triu(1)
    lag = (b[..., :, None] - b[..., None, :]).masked_fill(above, -torch.inf)
    return ((qc @ kc.transpose(-1, -2)) * torch.exp(lag).to(qc.dtype)) @ vc


def test_the_intra_chunk_backward_equals_autograd_under_bf16_autocast():
    """bf16 operands and float32 log-decays as phase8 trains them: output and every gradient
    as autograd through the composed form, to bf16's rounding of the T × T products."""
    g = torch.Generator().manual_seed(4)
    qc, kc, vc = (torch.randn(2, 3, 16, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    b = torch.cumsum(-torch.rand(2, 3, 16, generator=g) * 0.3, -1)
    up = torch.randn(2, 3, 16, 8, generator=g)
    runs = []
    for fn in (intra_chunk, _intra_composed):
        leaves = [t.clone().requires_grad_() for t in (qc, kc, vc, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(*leaves)
        (y.float() * up).sum().backward()
        runs.append([y] + [t.grad for t in leaves])
    for mine, ref in zip(*runs, strict=True):
        assert mine.dtype == ref.dtype
        torch.testing.assert_close(mine.float(), ref.float(), rtol=3e-2, atol=3e-2)


def test_the_intra_chunk_products_keep_only_their_inputs():
    qc, kc, vc = (torch.randn(1, 2, 4, 16, 8, requires_grad=True) for _ in range(3))
    b = torch.cumsum(-torch.rand(1, 2, 4, 16), -1).requires_grad_()
    kept = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        intra_chunk(qc, kc, vc, b)
    assert kept == {t.untyped_storage().data_ptr() for t in (qc, kc, vc, b)}
