"""Streaming (DESIGN §2): `init_state(B)` and `forward(ids, state)` on every family that has
them, in float64 on the CPU. Segments run one after another with the carried state give the
logits of one run over their concatenation, to 1e-10 (the runs differ only in summation order:
~1e-14 seen); Phase 2's state filters and zeta initialisation act when on."""

import dataclasses

import pytest
import torch

from muse import models
from muse.layers.state_filters import snr_adjustments
from muse.layers.zeta import zeta_token_table
from muse.measure.phases import lm_loss
from muse.models.common import StreamState

from .test_contract import BATCH, VOCAB, build_tiny, ids_for

TOL = 1e-10
STREAMING = [n for n in models.names() if hasattr(models.family(n).model_cls, "init_state")]


READOUT = dict(hebbian_conv=4, hebbian_qk_norm="l2", hebbian_decay="mamba2",
               hebbian_out_gate=True, local_window=16, ffn="swiglu", init="gpt2")


def variants():
    out = []
    for name in STREAMING:
        out.append(pytest.param(name, {}, id=name))
        fields = models.family(name).config_cls.field_names()
        if "moe_experts" in fields:
            out.append(pytest.param(name, {"ffn": "moe"}, id=f"{name}-moe"))
        if "hebbian_conv" in fields:  # the conv tail and the window's keys are carried too
            out.append(pytest.param(name, READOUT, id=f"{name}-readout"))
            out.append(pytest.param(name, {**READOUT, "bk_mixer": False}, id=f"{name}-no-bk"))
            out.append(pytest.param(name, {**READOUT, "hebbian_delta": True}, id=f"{name}-delta"))
            out.append(pytest.param(name, {**READOUT, "hebbian_delta": True,
                                           "hebbian_plain_heads": 1}, id=f"{name}-plain-head"))
        elif "local_window" in fields:
            extra = dict(local_window=16, local_heads=2, local_head_dim=8, head="dense",
                         init="gpt2", gate=True)
            extra = {k: v for k, v in extra.items() if k in fields}
            out.append(pytest.param(name, extra, id=f"{name}-local"))
    return out


def streamed(model, ids, cuts, state=None):
    state = model.init_state(ids.shape[0]) if state is None else state
    bounds = [0, *cuts, ids.shape[1]]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        logits, state = model(ids[:, a:b], state)
        parts.append(logits)
    return torch.cat(parts, dim=1), state


@pytest.mark.parametrize("name, overrides", variants())
def test_init_state_and_one_segment_equal_the_stateless_forward(name, overrides):
    model = build_tiny(name, **overrides).eval()
    ids = ids_for(45)
    state = model.init_state(BATCH)
    assert isinstance(state, StreamState) and state.tokens == 0
    with torch.no_grad():
        logits, after = model(ids, state)
        torch.testing.assert_close(logits, model(ids), rtol=0, atol=TOL)
    assert after.tokens == 45 and len(after.blocks) == len(model.blocks)


# 100 tokens; the Hebbian chunk is 64 at the tiny presets, so 37 and 99 cut inside a chunk
@pytest.mark.parametrize("cuts", [(1,), (37,), (64,), (65,), (99,), (20, 83), (30, 31, 64)],
                         ids=lambda c: "cut-" + "-".join(map(str, c)))
@pytest.mark.parametrize("name, overrides", variants())
def test_segments_with_the_carried_state_equal_one_run(name, overrides, cuts):
    model = build_tiny(name, **overrides).eval()
    ids = ids_for(100)
    with torch.no_grad():
        whole = model(ids)
        parts, state = streamed(model, ids, cuts)
    torch.testing.assert_close(parts, whole, rtol=0, atol=TOL)
    assert state.tokens == 100


@pytest.mark.parametrize("name", STREAMING)
def test_gradient_through_the_carried_state_equals_the_one_run_gradient(name):
    """Without detach, backpropagating through two segments is backpropagating through one run:
    every parameter gets the same gradient (1e-10)."""
    ids = ids_for(60)
    model = build_tiny(name).train()
    lm_loss(model(ids), ids).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    parts, _ = streamed(model, ids, (23,))
    lm_loss(parts, ids).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=TOL, msg=n)


@pytest.mark.parametrize("name", STREAMING)
def test_checkpointed_streaming_matches_and_detach_cuts_the_graph(name):
    model = build_tiny(name, checkpointing=True).train()
    ids = ids_for(50)
    parts, state = streamed(model, ids, (20,))
    torch.testing.assert_close(parts, model(ids), rtol=0, atol=TOL)
    parts.sum().backward()
    cut = state.detach()
    leaves = [t for b in cut.blocks for t in _tensors(b)]
    assert leaves and not any(t.requires_grad for t in leaves)
    assert cut.tokens == state.tokens and cut.batch_size == state.batch_size


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for v in tree.values() for t in _tensors(v)]


@pytest.mark.parametrize("name", STREAMING)
def test_a_state_for_another_batch_or_no_state_object_is_refused(name):
    model = build_tiny(name).eval()
    with pytest.raises(ValueError, match="batch 3"):
        model(ids_for(5), model.init_state(3))
    with pytest.raises(TypeError, match="StreamState"):
        model(ids_for(5), {"blocks": []})


# Phase 2: the filters on the carried state, and zeta initialisation


def phase2(seed=0, **overrides):
    return build_tiny("phase2", seed=seed, **overrides).eval()


def test_filters_act_between_segments_only():
    ids = ids_for(80)
    plain = phase2()
    with torch.no_grad():
        whole = plain(ids)
        for option in ({"snr_filter": True, "snr_threshold": 5.0}, {"resonance": True}):
            model = phase2(**option)
            # same weights: the filters hold no parameters; stateless and first segment as before
            torch.testing.assert_close(model(ids), whole, rtol=0, atol=0)
            parts, _ = streamed(model, ids, (40,))
            torch.testing.assert_close(parts[:, :40], whole[:, :40], rtol=0, atol=TOL)
            assert (parts[:, 40:] - whole[:, 40:]).abs().max() > 1e-6, option


def test_snr_filter_hands_its_adjustments_to_the_next_segment():
    model = phase2(snr_filter=True, snr_threshold=5.0, snr_gamma_scale=0.2, snr_eta_scale=0.3)
    ids = ids_for(70)
    with torch.no_grad():
        _, state = model(ids[:, :30], model.init_state(BATCH))
        for block in state.blocks:
            gamma, eta = snr_adjustments(block["hebbian"], 5.0, 0.2, 0.3)
            assert torch.equal(block["gamma_offset"], gamma)
            assert torch.equal(block["eta_scale"], eta)
            assert (block["gamma_offset"] > 0).all()  # SNR ≈ 0.8 < τ = 5: forget faster
        # the second segment runs each Hebbian layer with exactly those adjustments
        seen = []
        hooks = [
            b.hebbian.register_forward_hook(lambda _m, _a, kw, _o: seen.append(kw),
                                            with_kwargs=True)
            for b in model.blocks
        ]
        try:
            model(ids[:, 30:], state)
        finally:
            for h in hooks:
                h.remove()
    for kw, block in zip(seen, state.blocks, strict=True):
        assert kw["gamma_offset"] is block["gamma_offset"]
        assert kw["eta_scale"] is block["eta_scale"]


def test_resonance_leaves_a_projected_state():
    model = phase2(resonance=True, resonance_modes=16, resonance_threshold=0.05)
    with torch.no_grad():
        _, state = model(ids_for(50), model.init_state(BATCH))
        for block, carried in zip(model.blocks, state.blocks, strict=True):
            w = carried["hebbian"]
            torch.testing.assert_close(block.resonance(w), w, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"snr_threshold": 0.3}, "snr_threshold=0.3 only act"),
        ({"resonance_modes": 8}, "resonance_modes=8 only act"),
        ({"snr_filter": True, "snr_gamma_scale": 0.0, "snr_eta_scale": 0.0}, "do nothing"),
        ({"resonance": True, "resonance_modes": 33}, r"\[0, head_dim=32\]"),
        ({"resonance": True, "resonance_threshold": 1.5}, "resonance_threshold"),
    ],
)
def test_filter_settings_are_never_silently_ignored(overrides, match):
    with pytest.raises(ValueError, match=match):
        models.build("phase2", "tiny", **overrides)


ZETA = [("phase2", {}), ("phase1", {"embedding": "dense"})]


@pytest.mark.parametrize("name, extra", ZETA, ids=[n for n, _ in ZETA])
def test_zeta_init_sets_the_embedding_to_the_zeta_table(name, extra):
    a = build_tiny(name, seed=0, zeta_init=True, **extra)
    b = build_tiny(name, seed=1, zeta_init=True, **extra)
    plain = build_tiny(name, seed=0, **extra)
    d_model = a.config.d_model
    table = zeta_token_table(VOCAB, d_model).float().double()  # built float32, then .double()
    assert torch.equal(a.embed.weight, table) and torch.equal(b.embed.weight, table)
    assert not torch.allclose(plain.embed.weight, table, atol=1e-3)
    # only the embedding differs from the default init
    others = [k for k in a.state_dict() if k != "embed.weight"]
    assert all(torch.equal(a.state_dict()[k], plain.state_dict()[k]) for k in others)


@pytest.mark.parametrize("name, extra", ZETA, ids=[n for n, _ in ZETA])
def test_zeta_initialised_model_trains(name, extra):
    torch.manual_seed(0)
    model = models.build(name, "tiny", vocab_size=VOCAB, zeta_init=True, **extra).train()
    ids = ids_for(32).repeat(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = lm_loss(model(ids), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_zeta_init_needs_a_dense_table():
    with pytest.raises(ValueError, match="zeta_init.*'htt'"):
        models.build("phase1", "tiny", zeta_init=True)


def test_filter_config_fields_have_off_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(models.family("phase2").config_cls)}
    assert fields["snr_filter"] is False and fields["resonance"] is False
    assert fields["zeta_init"] is False
