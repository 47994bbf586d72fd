"""Phase 7 specifics beyond the contract: matched baselines, the 1.5b count, the head options,
the BK gate, exact streaming across the window and causality, strict config."""

import pytest
import torch

from muse import models
from muse.layers.htt import HTTEmbedding
from muse.measure.gradient import gradient_flow
from muse.measure.phases import random_ids
from muse.models.phase7 import gated_mix

TOL = 1e-10
VOCAB = 97


def count(name, preset, **overrides):
    with torch.device("meta"):
        return models.build(name, preset, **overrides).num_params()


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return models.build("phase7", "tiny", vocab_size=VOCAB, **overrides).double().eval()


def test_the_1_5b_preset_builds_its_real_count():
    cfg = models.config("phase7", "1.5b")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.window, cfg.htt_rank,
            cfg.ar_ssm_rank) == (2048, 24, 16, 128, 32, 64)
    # 1,329,540,728 at 50257 tokens: 1.33B with its FFN (the seeds' "1.5B" built 0.44B, no FFN)
    assert count("phase7", "1.5b") == 1_329_540_728


def test_the_default_head_is_untied_and_tied_reads_the_htt_table():
    dense, tied = tiny(), tiny(head="tied")
    assert isinstance(dense.embed, HTTEmbedding) and dense.head.shape == (VOCAB, 64)
    assert dense.output_table() is dense.head
    assert not hasattr(tied, "head")
    assert torch.equal(tied.output_table(), tied.embed.full_table())
    assert dense.num_params() - tied.num_params() == VOCAB * 64


def test_gate_lies_in_the_unit_interval_and_streams():
    gate = tiny().blocks[0].gate
    x = torch.randn(2, 40, 64, dtype=torch.float64)
    g = gate(x)
    assert g.shape == x.shape and ((g > 0) & (g < 1)).all()
    assert torch.equal(torch.sigmoid(gate.scale * gate(x, logit=True)), g)
    carry, parts = gate.init_carry(2, dtype=torch.float64), []
    for a, b in ((0, 13), (13, 14), (14, 40)):
        y, carry = gate(x[:, a:b], carry)
        parts.append(y)
    assert torch.allclose(torch.cat(parts, 1), g, rtol=TOL, atol=TOL)


def test_a_dense_embedding_ties_its_own_table():
    m = tiny(embedding="dense", head="tied")
    assert isinstance(m.embed, torch.nn.Embedding)
    assert m.output_table() is m.embed.weight


@pytest.mark.parametrize("head, embedding", [("dense", "htt"), ("tied", "htt"), ("tied", "dense")])
@pytest.mark.parametrize("cut", [1, 15, 16, 40])
def test_two_segments_equal_one_pass(head, embedding, cut):
    m = tiny(head=head, embedding=embedding)  # window 16: cuts before, at and past it
    ids = random_ids(VOCAB, 2, 50, "cpu")
    whole = m(ids)
    first, state = m(ids[:, :cut], m.init_state(2))
    second, state = m(ids[:, cut:], state)
    assert torch.allclose(torch.cat((first, second), 1), whole, rtol=TOL, atol=TOL)
    assert state.tokens == 50 and state.blocks[0]["local"]["k"].shape[2] == 15


def test_future_tokens_do_not_change_earlier_logits():
    m = tiny()
    ids = random_ids(VOCAB, 1, 40, "cpu")
    other = ids.clone()
    other[:, 25:] = (other[:, 25:] + 1) % VOCAB
    a, b = m(ids), m(other)
    assert torch.equal(a[:, :25], b[:, :25]) and not torch.equal(a[:, 25:], b[:, 25:])


def test_every_path_moves_the_output():
    m = tiny()
    block = m.blocks[0]
    x = m.embed(random_ids(VOCAB, 1, 20, "cpu"))
    y = block(x)
    for path in (block.local, block.ssm, block.gate):
        with torch.no_grad():
            for p in path.parameters():
                p.add_(0.1)
        assert (block(x) - y).abs().max() > 1e-8
        y = block(x)


@pytest.mark.parametrize("overrides, match", [
    ({"window": 0}, "window must be a positive integer, got 0"),
    ({"head_dim": 31}, "head_dim must be even"),
    ({"curvature": -1.0}, "curvature must be a number > 0, got -1.0"),
    ({"beta_init": 0}, "beta_init must be a number > 0"),
    ({"head": "htt"}, r"head must be one of \('dense', 'tied'\), got 'htt'"),
    ({"embedding": "hash"}, r"embedding must be one of \('htt', 'dense'\), got 'hash'"),
    ({"init": "xavier"}, "init must be one of"),
    ({"backend": "cuda"}, "backend must be one of"),
    ({"ar_ssm_decay_init": (0.9, 1.0)}, "ar_ssm_decay_init must satisfy"),
    ({"htt_rank": 0}, "htt_rank must be a positive integer"),
])
def test_bad_config_names_the_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.build("phase7", "tiny", **overrides)


def test_long_range_gradient_reaches_the_first_token_past_the_window():
    torch.manual_seed(0)
    m = models.build("phase7", "tiny", vocab_size=VOCAB)  # window 16: only the AR-SSM and BK reach
    flow = gradient_flow(m, random_ids(VOCAB, 1, 512, "cpu"), torch.float32)
    assert flow.finite and flow.long_range_grad_norm > 0


def test_bf16_weights_give_finite_logits_and_distances_in_float32():
    torch.manual_seed(0)
    m = models.build("phase7", "tiny", vocab_size=VOCAB).to(torch.bfloat16)
    out = m(random_ids(VOCAB, 2, 40, "cpu"))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _plain_mix(x, p, scale, loc, glob):
    g = torch.sigmoid(scale * p)
    return x + g * loc + (1 - g) * glob


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_gated_mix_node_equals_the_plain_expression(dtype):
    """The block's x + g ⊙ loc + (1 − g) ⊙ glob, g = σ(s·p), as one node (g formed again in
    backward): the value and ∂x, ∂p, ∂s, ∂loc, ∂glob against autograd through the plain
    expression, in float64, and bit for bit with p, loc and glob bf16 and x and s float32 (as under
    autocast)."""
    g = torch.Generator().manual_seed(0)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    x, up = (torch.randn(2, 9, 16, generator=g, dtype=torch.float64).to(wide) for _ in range(2))
    p, loc, glob = (torch.randn(2, 9, 16, generator=g, dtype=torch.float64).to(dtype)
                    for _ in range(3))
    scale = torch.tensor(1.3, dtype=wide)
    runs = []
    for fn in (gated_mix, _plain_mix):
        leaves = [t.clone().requires_grad_() for t in (x, p, scale, loc, glob)]
        out = fn(*leaves)
        (out * up).sum().backward()
        runs.append([out.detach(), *(t.grad for t in leaves)])
    for name, a, b in zip(("out", "x", "p", "scale", "loc", "glob"), *runs, strict=True):
        assert a.dtype == b.dtype, name
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=name)
        else:
            assert torch.equal(a, b), name


def test_the_gated_mix_keeps_p_loc_and_glob_not_g():
    """6 bytes a token and channel (p, loc, glob in bf16) where autograd through the plain
    expression keeps 10 (g and 1 − g besides)."""
    n, d = 32, 16
    x = torch.randn(1, n, d, requires_grad=True)
    p, loc, glob = (torch.randn(1, n, d).to(torch.bfloat16).requires_grad_() for _ in range(3))
    scale = torch.tensor(1.0, requires_grad=True)
    per_token = []
    for fn in (gated_mix, _plain_mix):
        kept = {}

        def pack(t, kept=kept):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, p, scale, loc, glob)
        per_token.append(sum(b for b in kept.values() if b > 4) / (n * d))
    assert per_token == [6, 10]


def test_under_bf16_autocast_a_block_keeps_its_normed_input_once():
    """The BK gate's two projections, the attention's qkv and the AR-SSM's conv, gate, u and w
    read one bf16 copy of the normed input (layers.cast): backward keeps that copy once, where
    each projection kept its own cast."""
    torch.manual_seed(0)
    # float32 weights; a dense table keeps the residual stream float32 under autocast, as in
    # `small` (the HTT embedding's output is already bf16, and so is the normed input)
    m = models.build("phase7", "tiny", vocab_size=VOCAB, embedding="dense", head="tied")
    seen = {}
    m.blocks[0].ln_mix.register_forward_hook(lambda mod, a, out: seen.setdefault("h", out))
    kept = {}

    def pack(t):
        kept.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        m(random_ids(VOCAB, 2, 40, "cpu"))
    image = seen["h"].detach().to(torch.bfloat16).flatten()

    def holds_the_normed_input(t):
        s = t.untyped_storage()
        return (t.dtype == torch.bfloat16 and s.nbytes() == image.numel() * 2
                and torch.equal(torch.empty(0, dtype=torch.bfloat16).set_(s), image))

    assert sum(holds_the_normed_input(t) for t in kept.values()) == 1
