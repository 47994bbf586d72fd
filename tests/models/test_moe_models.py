"""Phase 1 and Phase 2 with the MoE FFN (`ffn="moe"`): the contract's forward, causality and
gradient checks at the tiny size, the config checks, the auxiliary loss and the diagnostics,
and the trainer adding the weighted auxiliary loss."""

import pytest
import torch

from muse import models
from muse.layers.mlp import MLP
from muse.layers.moe import MoE
from muse.measure.causality import causal_leak
from muse.measure.phases import lm_loss, random_ids
from muse.training.train import TrainConfig, train, weighted_aux_loss

VOCAB = 97
FAMILIES = ["phase1", "phase2"]


def build(name, seed=0, **overrides):
    torch.manual_seed(seed)
    overrides = {"ffn": "moe", "moe_experts": 4, "moe_top_k": 2, **overrides}
    return models.build(name, "tiny", vocab_size=VOCAB, **overrides).double()


@pytest.mark.parametrize("name", FAMILIES)
def test_presets_keep_the_mlp(name):
    for preset in models.presets(name):
        assert models.config(name, preset).ffn == "mlp"
    m = models.build(name, "tiny", vocab_size=VOCAB)
    assert all(isinstance(b.ffn, MLP) for b in m.blocks)
    assert m.aux_loss().item() == 0.0 and m.diagnostics() == {}


@pytest.mark.parametrize("name", FAMILIES)
def test_moe_blocks_run_forward_backward_and_every_expert_learns(name):
    m = build(name).train()
    assert all(isinstance(b.ffn, MoE) and len(b.ffn.experts) == 4 for b in m.blocks)
    ids = random_ids(VOCAB, 2, 33, "cpu", seed=1)
    logits = m(ids)
    assert logits.shape == (2, 33, VOCAB) and torch.isfinite(logits).all()
    aux = m.aux_loss()
    # one Switch loss per block, each near 1 for a freshly initialised, near-uniform router
    assert aux.dim() == 0 and 0.5 * len(m.blocks) < aux.item() < 4 * len(m.blocks)
    (lm_loss(logits, ids) + 0.01 * aux).backward()
    # one step first: a zero-initialised output (Phase 2's BK) passes no gradient to what feeds
    # it until that output has moved, and then it must
    torch.optim.SGD(m.parameters(), lr=0.01).step()
    m.zero_grad()
    (lm_loss(m(ids), ids) + 0.01 * m.aux_loss()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"parameters without a gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("t", [0, 16, 31])
def test_moe_models_stay_causal(name, t):
    m = build(name).eval()
    # Future tokens change how many rows each expert's matmul sees, not the arithmetic of a
    # past row; the margin allows for a BLAS whose reduction order depends on the row count.
    assert causal_leak(m, random_ids(VOCAB, 2, 33, "cpu", seed=1), t) <= 1e-12


@pytest.mark.parametrize("name", FAMILIES)
def test_diagnostics_report_the_expert_load(name):
    m = build(name)
    with torch.no_grad():
        m(random_ids(VOCAB, 2, 33, "cpu", seed=1))
        diag = m.diagnostics()
    assert {"moe_load_max", "moe_load_min", "moe_aux_loss"} <= set(diag)
    assert set(diag) - {"moe_load_max", "moe_load_min", "moe_aux_loss"} <= {
        "decay_min", "decay_median", "decay_max"}  # phase2's Hebbian heads
    assert 0 <= diag["moe_load_min"] <= 1 / 4 <= diag["moe_load_max"] <= 1
    assert diag["moe_aux_loss"] == pytest.approx(m.aux_loss().item())


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpointed_blocks_give_the_same_aux_gradient(name):
    ids = random_ids(VOCAB, 2, 17, "cpu", seed=1)
    grads = []
    for checkpointing in (False, True):
        m = build(name, checkpointing=checkpointing).train()
        (lm_loss(m(ids), ids) + m.aux_loss()).backward()
        grads.append(torch.cat([b.ffn.router.weight.grad.flatten() for b in m.blocks]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(
    "override,match",
    [
        (dict(ffn="gelu"), r"ffn must be one of mlp, swiglu, moe, got 'gelu'"),
        (dict(moe_top_k=1), r"moe_top_k must be in \[2, moe_experts=8\], got 1"),
        (dict(moe_experts=4, moe_top_k=5), r"moe_top_k must be in \[2, moe_experts=4\], got 5"),
        (dict(moe_experts=1), r"moe_experts must be ≥ 2 for a mixture, got 1"),
        (dict(moe_aux_weight=-0.1), r"moe_aux_weight must be a number ≥ 0, got -0.1"),
    ],
)
def test_bad_ffn_settings_are_rejected_by_name(name, override, match):
    with pytest.raises(ValueError, match=match):
        models.config(name, "tiny", **override)


def test_weighted_aux_loss_uses_the_config_weight():
    m = build("phase2", moe_aux_weight=0.25)
    m(random_ids(VOCAB, 1, 9, "cpu"))
    assert weighted_aux_loss(m).item() == pytest.approx(0.25 * m.aux_loss().item())
    m.config.moe_aux_weight = 0.0
    assert weighted_aux_loss(m) == 0.0
    assert weighted_aux_loss(models.build("transformer", "tiny")) == 0.0


def test_trainer_runs_an_moe_model_and_logs_its_expert_load(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text("the cat sat on the mat. " * 40, encoding="utf-8")
    cfg = TrainConfig(model="phase1:tiny",
                      model_overrides={"vocab_size": 256, "ffn": "moe", "moe_experts": 4},
                      corpus=str(folder), tokenizer="bytes", seq_len=32, batch_size=2, steps=2,
                      warmup_steps=1, eval_every=0, eval_tokens=256, out_dir=str(tmp_path / "run"),
                      device="cpu", progress=False)
    result = train(cfg)
    for row in result.history:
        diag = row["diagnostics"]
        assert 0 <= diag["moe_load_min"] <= 0.25 <= diag["moe_load_max"] <= 1
        assert diag["moe_aux_loss"] > 0
