"""The model contract (DESIGN §2), checked for every registered family at its tiny preset.

Everything runs in float64 on the CPU, so "unchanged" can mean bit-for-bit where the
arithmetic allows it.
"""

import dataclasses

import pytest
import torch
import torch.nn as nn

from muse import models
from muse.measure.causality import causal_leak
from muse.measure.gradient import gradient_flow
from muse.measure.phases import lm_loss, random_ids

VOCAB = 97
BATCH = 2
NAMES = models.names()


def build_tiny(name: str, seed: int = 0, **overrides) -> nn.Module:
    assert "tiny" in models.presets(name), (
        f"model family {name!r} has no 'tiny' preset (presets: {models.presets(name)}); "
        "every family needs one for the CPU unit tests"
    )
    torch.manual_seed(seed)
    return models.build(name, "tiny", vocab_size=VOCAB, **overrides).double()


def ids_for(seq: int, seed: int = 1) -> torch.Tensor:
    return random_ids(VOCAB, BATCH, seq, "cpu", seed=seed)


def _runs_on_cpu(name: str):
    reason = models.family(name).cuda_only
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        bool(reason), reason=f"CUDA only, not run by these CPU tests: {reason}"))


@pytest.fixture(params=[_runs_on_cpu(n) for n in NAMES])
def name(request):
    return request.param


@pytest.mark.parametrize("seq", [1, 2, 7, 33], ids=lambda n: f"seq{n}")
def test_logits_have_shape_batch_seq_vocab(name, seq):
    model = build_tiny(name).eval()
    with torch.no_grad():
        logits = model(ids_for(seq))
    assert logits.shape == (BATCH, seq, VOCAB)
    assert logits.dtype == torch.float64
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("where", ["first", "middle", "second-last"])
def test_future_tokens_do_not_move_past_logits(name, where):
    seq = 33
    t = {"first": 0, "middle": seq // 2, "second-last": seq - 2}[where]
    model = build_tiny(name).eval()
    # Exactly zero, not "small": in float64 a causal model computes the logits at positions
    # ≤ t from the same numbers whatever follows t (causal masks add -inf before the softmax,
    # so future scores contribute exactly 0), and any real leak is far above rounding.
    assert causal_leak(model, ids_for(seq), t) == 0.0


def test_same_seed_builds_same_weights_and_logits(name):
    a, b = build_tiny(name, seed=3).eval(), build_tiny(name, seed=3).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ids = ids_for(33)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_repeated_calls_give_identical_logits(name):
    # Also the "no hidden state carried between calls" clause of the contract.
    model = build_tiny(name).eval()
    ids = ids_for(33)
    with torch.no_grad():
        first = model(ids)
        model(ids_for(33, seed=2))
        second = model(ids)
    assert torch.equal(first, second)


def test_forward_and_backward_are_finite_and_reach_every_parameter(name):
    model = build_tiny(name).train()
    ids = ids_for(33)
    loss = lm_loss(model(ids), ids)
    assert torch.isfinite(loss)
    loss.backward()
    # named_parameters() lists a tied weight once, under its first name; it must still get
    # the gradient of both uses.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    nonfinite = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not nonfinite, f"parameters with a non-finite gradient: {nonfinite}"


def test_the_chunked_loss_equals_the_loss_of_the_logits_with_its_gradients(name):
    model = build_tiny(name).train()
    ids = ids_for(20)
    full = lm_loss(model(ids), ids)
    want = torch.autograd.grad(full, list(model.parameters()), allow_unused=True)
    chunked = model(ids, loss_chunk=9)  # 38 scored positions: chunks of 9, 9, 9, 9 and 2
    assert torch.allclose(chunked, full, rtol=1e-10, atol=0)
    got = torch.autograd.grad(chunked, list(model.parameters()), allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), want, got, strict=True):
        assert (a is None) == (b is None), n
        assert a is None or torch.allclose(a, b, rtol=1e-8, atol=1e-12), n


# the baselines and the fla peers need not stream
BASELINES = {"transformer", "transformer-eager", *(n for n in NAMES if n.startswith("fla-"))}


def test_every_muse_family_streams():
    """Streaming families expose `init_state(batch)` and `forward(ids, state)` (DESIGN §2);
    tests/models/test_streaming.py checks each of them against one run."""
    muse_families = [n for n in NAMES if n not in BASELINES]
    missing = [
        n for n in muse_families
        if not callable(getattr(models.family(n).model_cls, "init_state", None))
    ]
    assert not missing, f"MUSE families without init_state: {missing}"


def test_unknown_config_key_raises_type_error_naming_it(name):
    with pytest.raises(TypeError, match="bogus_key"):
        models.build(name, "tiny", bogus_key=1)


def test_unknown_preset_raises_listing_the_presets(name):
    with pytest.raises(ValueError, match="no-such-preset") as err:
        models.build(name, "no-such-preset")
    for preset in models.presets(name):
        assert preset in str(err.value)


def test_unknown_model_raises_listing_the_models():
    with pytest.raises(ValueError, match="'nope'") as err:
        models.build("nope")
    for known in NAMES:
        assert known in str(err.value)


def test_num_params_counts_each_parameter_once(name):
    model = build_tiny(name)
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    assert model.num_params() == sum(p.numel() for p in unique.values())


def test_config_is_a_dataclass_and_layers_are_named(name):
    model = build_tiny(name)
    assert dataclasses.is_dataclass(model.config) and not isinstance(model.config, type)
    assert model.config.vocab_size == VOCAB
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) >= 1
    assert isinstance(model.embed, nn.Module)


def test_embed_output_is_h0_and_feeds_the_logits(name):
    """The gradient-flow probe hooks `embed`: it must run once per forward, give [B, N, D],
    and be what the rest of the model reads (its gradient from the last logits is non-zero)."""
    model = build_tiny(name).eval()
    ids = ids_for(7)
    seen = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        seen.append(output)

    handle = model.embed.register_forward_hook(keep)
    try:
        logits = model(ids)
    finally:
        handle.remove()
    assert len(seen) == 1, f"embed ran {len(seen)} times in one forward"
    h0 = seen[0]
    assert h0.dim() == 3 and h0.shape[:2] == (BATCH, 7)
    d_model = getattr(model.config, "d_model", None)
    if d_model is not None:
        assert h0.shape[2] == d_model
    torch.testing.assert_close(h0, model.embed(ids), rtol=0, atol=0)
    logits[:, -1].sum().backward()
    assert h0.grad is not None and h0.grad[:, -1].abs().sum() > 0


def test_every_block_changes_its_input(name):
    m = build_tiny(name).eval()
    x = m.embed(ids_for(33))
    for block in m.blocks:
        y = block(x)
        assert (y - x).abs().max() > 1e-6
        x = y


def test_long_range_gradient_reaches_the_first_token_at_1024(name):
    torch.manual_seed(0)
    m = models.build(name, "tiny", vocab_size=VOCAB)
    flow = gradient_flow(m, random_ids(VOCAB, 1, 1024, "cpu"), torch.float32)
    assert flow.finite and flow.long_range_grad_norm > 0
