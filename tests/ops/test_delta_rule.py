"""The gated delta rule: the chunked form against the per-token definition in float64."""

import pytest
import torch
import torch.nn.functional as F

from muse.ops.delta_rule import chunk_layout, decay_ratios, delta_rule_chunked, delta_rule_naive


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


def test_decoding_token_by_token_equals_one_run():
    # one token takes the recurrent step, not a chunk padded to T: the same values and state
    q, k, v, ld, beta = inputs(12)
    y, w = delta_rule_chunked(q, k, v, ld, beta, chunk=8)
    state, ys = None, []
    for t in range(12):
        y_t, state = delta_rule_chunked(*(x[:, :, t:t + 1] for x in (q, k, v, ld, beta)),
                                        state=state, chunk=8)
        ys.append(y_t)
    assert torch.allclose(torch.cat(ys, dim=2), y, rtol=1e-12, atol=1e-12)
    assert torch.allclose(state, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 40])
def test_half_precision_inputs_are_solved_in_float32(n):
    args = [t.to(torch.bfloat16) for t in inputs(n)]
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


def _projections(n, dtype, seed, b=2, h=3, d=8):
    """q, k, v as the Hebbian layer hands them over: heads 1… of (B, N, H + 1, D) projections,
    transposed to (B, H, N, D) views (strided, not contiguous), k of unit length."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, h + 1, 3, d, generator=g, dtype=torch.float64)
    x = torch.cat((x[..., :1, :], F.normalize(x[..., 1:2, :], dim=-1), x[..., 2:, :]), dim=3)
    log_decay = -torch.rand(b, h, n, generator=g, dtype=torch.float64) * 0.5
    beta = torch.rand(b, h, n, generator=g, dtype=torch.float64)
    up = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    wide = torch.promote_types(dtype, torch.float32)
    return x.to(dtype), log_decay.to(wide), beta.to(wide), up


def _previous_form(q, k, v, log_decay, beta, state=None, chunk=64):
    """delta_rule_chunked before its saved-activation cuts (as of b88de6b): q, k, v cast keeping
    their strides, then every step by autograd op by op."""
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        return _previous_chunked(*(t.to(acc) for t in (q, k, v, log_decay, beta)),
                                 None if state is None else state.to(acc), chunk)


def _previous_chunked(q, k, v, log_decay, beta, state, chunk):
    bsz, heads, n, dk = q.shape
    dv = v.shape[-1]
    m = -(-n // chunk)
    # the layout is unchanged: what follows it is the previous form
    qc, kc, vc, bc, b = chunk_layout(q, k, v, log_decay, beta, chunk)
    ratio = decay_ratios(b).to(qc.dtype)
    strict = ratio.masked_fill(torch.eye(chunk, dtype=torch.bool, device=q.device), 0.0)
    a = bc * strict * (kc @ kc.transpose(-1, -2))
    eye = torch.eye(chunk, dtype=qc.dtype, device=q.device)
    gamma = torch.exp(b)[..., None].to(qc.dtype)
    rhs = torch.cat((bc * vc, bc * gamma * kc), dim=-1)
    solved = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    u0, p = solved[..., :dv], solved[..., dv:]
    scores = ratio * (qc @ kc.transpose(-1, -2))  # (B, H, M, T, T)
    tail = torch.exp(b[..., -1:] - b)[..., None].to(kc.dtype) * kc  # k_j γ_T/γ_j
    through = torch.exp(b[..., -1]).to(qc.dtype)[..., None, None]  # γ_T per chunk
    # W_T = (γ_T I − tailᵀP) W_0 + tailᵀU₀: an affine map per chunk, built for all chunks at
    # once, so the sequential part is one batched multiply-add per chunk
    eye_k = torch.eye(dk, dtype=qc.dtype, device=q.device)
    step = (through * eye_k - tail.transpose(-1, -2) @ p).flatten(0, 1)  # (BH, M, Dk, Dk)
    push = (tail.transpose(-1, -2) @ u0).flatten(0, 1)  # (BH, M, Dk, Dv)
    w = q.new_zeros(bsz * heads, dk, dv) if state is None else state.reshape(-1, dk, dv)
    entering = []
    # unbind, not step[:, c]: the backward of M selections would add M full-size zero tensors
    for step_c, push_c in zip(step.unbind(1), push.unbind(1), strict=True):
        entering.append(w)
        w = torch.baddbmm(push_c, step_c, w)
    w0 = torch.stack(entering, dim=1).view(bsz, heads, m, dk, dv)
    y = gamma * (qc @ w0) + scores @ (u0 - p @ w0)
    return y.reshape(bsz, heads, m * chunk, dv)[:, :, :n], w.view(bsz, heads, dk, dv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n,chunk", [(37, 8), (64, 16)])
@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("values_only", [False, True])
def test_chunked_equals_its_previous_form(dtype, n, chunk, carried, values_only):
    """y, W and every gradient (q, k, v through the projections, log-decay, β, the carried W)
    as the previous form's to rounding: an ulp of its own dtype, elementwise, beside 8 ulp of
    the dtype it is summed in times its largest entry (the solve is now an inverse and a
    product, the backward's products lay their operands out otherwise, and a CPU's BLAS may
    pick another kernel for them). In float64, and from bf16 projections (solved in float32,
    as under autocast); with `values_only` the log-decays and β take no gradient."""
    x0, ld0, beta0, up = _projections(n, dtype, seed=n + chunk)
    s0 = torch.randn(2, 3, 8, 8, dtype=ld0.dtype) if carried else None
    runs = []
    for fn in (delta_rule_chunked, _previous_form):
        x = x0.clone().requires_grad_()
        ld, beta = (t.clone().requires_grad_(not values_only) for t in (ld0, beta0))
        state = None if s0 is None else s0.clone().requires_grad_()
        q, k, v = (t.transpose(1, 2)[:, 1:] for t in x.unbind(3))
        y, w = fn(q, k, v, ld, beta, state=state, chunk=chunk)
        ((y.double() * up).sum() + w.double().square().sum()).backward()
        runs.append([y, w, x.grad] + ([] if values_only else [ld.grad, beta.grad])
                    + ([] if s0 is None else [state.grad]))
    (y, w, *grads), (y0, w0, *grads0) = runs
    assert y.dtype == y0.dtype
    summed_ulp = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    for a, b in zip([y, w, *grads], [y0, w0, *grads0], strict=True):
        assert a.dtype == b.dtype
        assert torch.allclose(a, b, rtol=torch.finfo(a.dtype).eps,
                              atol=8 * summed_ulp * float(b.abs().max()))


def _saved_bytes(fn, *args, **kwargs):
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(kept.values())


def test_keeps_q_k_and_the_states_once_and_no_elementwise_products_of_its_inputs():
    """From bf16 head views, N = 256, T = 64, D = 8, 3 heads: the previous form kept k in
    float32 four times (its own cast and the products' contiguous copies of k and kᵀ), q twice,
    and the strict ratio and β·ratio ((T × T) float32 each, per chunk) for A; now each once or
    not at all, nor the scores (ratio ⊙ qkᵀ) and the tail keys (k_j γ_T/γ_j). Per token and
    head that is 3·D·4 + D·4 + 2·T·4 + T·4 + D·4 = 928 bytes fewer, the diagonal mask (T × T
    bools) is no longer kept, and the state entering each chunk ((D × D) float32) is kept
    once, not twice. v is kept as the bf16 view it comes in, not as a float32 copy (N·H·D·4
    bytes): its storage, the projections (N·(H + 1)·3·D·2 bytes), counts here, where nothing
    else keeps it; in the layer the q, k norms keep it anyway."""
    n, t, d, h = 256, 64, 8, 3
    x, ld, beta, _ = _projections(n, torch.bfloat16, seed=1, b=1, h=h, d=d)
    x.requires_grad_()
    ld.requires_grad_()
    beta.requires_grad_()
    q, k, v = (u.transpose(1, 2)[:, 1:] for u in x.unbind(3))
    now = _saved_bytes(delta_rule_chunked, q, k, v, ld, beta, chunk=t)
    before = _saved_bytes(_previous_form, q, k, v, ld, beta, chunk=t)
    per_token_and_head = 3 * d * 4 + d * 4 + 2 * t * 4 + t * 4 + d * 4
    v_kept = n * h * d * 4 - n * (h + 1) * 3 * d * 2
    assert before - now == (per_token_and_head * n * h + t * t + (n // t) * h * d * d * 4
                            + v_kept)


@pytest.mark.parametrize("carried", [False, True])
def test_recompute_gives_the_same_values_and_gradients(carried):
    """`recompute` runs the same form again in backward: y, W and every gradient bit for bit
    (float64)."""
    x0, ld0, beta0, up = _projections(37, torch.float64, seed=5)
    s0 = torch.randn(2, 3, 8, 8, dtype=torch.float64) if carried else None
    runs = []
    for recompute in (False, True):
        x, ld, beta = (t.clone().requires_grad_() for t in (x0, ld0, beta0))
        state = None if s0 is None else s0.clone().requires_grad_()
        q, k, v = (t.transpose(1, 2)[:, 1:] for t in x.unbind(3))
        y, w = delta_rule_chunked(q, k, v, ld, beta, state=state, chunk=8, recompute=recompute)
        ((y * up).sum() + w.square().sum()).backward()
        runs.append([y, w, x.grad, ld.grad, beta.grad] + ([] if s0 is None else [state.grad]))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_recompute_keeps_only_the_inputs_in_their_own_dtype():
    """From bf16 head views (N = 256, T = 64, D = 8, 3 heads): with `recompute` backward keeps
    the bf16 projections q, k and v are views of, and the float32 log-decays and β, nothing
    of the chunk form: no float32 copy of q or k, no (T × T) products, no states."""
    n, t, d, h = 256, 64, 8, 3
    x, ld, beta, _ = _projections(n, torch.bfloat16, seed=1, b=1, h=h, d=d)
    for z in (x, ld, beta):
        z.requires_grad_()
    q, k, v = (u.transpose(1, 2)[:, 1:] for u in x.unbind(3))
    kept = _saved_bytes(delta_rule_chunked, q, k, v, ld, beta, chunk=t, recompute=True)
    assert kept == x.numel() * 2 + (ld.numel() + beta.numel()) * 4
