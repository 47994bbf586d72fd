"""`muse export CKPT OUT_DIR`: a save_pretrained folder that AutoModelForCausalLM loads, after
`import muse.hf`, into the checkpoint's model: the same logits, bit for bit (tolerance 0: the
same weights through the same code on the CPU), in float32 as saved and in float64, and
generate() gives muse's own greedy continuation. A user's mistake is one line and exit 2."""

import json
import sys

import pytest
import torch

from muse.cli import main
from muse.training.evaluate import load_model
from muse.training.train import TrainConfig, train

from .cli_checks import usage_error

transformers = pytest.importorskip("transformers")
import muse.hf  # noqa: E402,F401  (registers the families with the Auto classes)

FAMILIES = ["transformer:tiny", "phase1:tiny", "phase2:tiny"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text("the cat sat on the mat . " * 30)
    return folder


def checkpoint(corpus, root, spec):
    train(TrainConfig(model=spec, corpus=str(corpus), tokenizer="bytes", seq_len=16,
                      batch_size=2, steps=1, eval_tokens=64, out_dir=str(root / "run"),
                      device="cpu", progress=False))
    return root / "run" / "final.pt"


def greedy(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("spec", FAMILIES)
def test_exported_folder_loads_with_the_same_logits(corpus, tmp_path, capsys, spec):
    ckpt = checkpoint(corpus, tmp_path, spec)
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out)]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"muse-{spec.partition(':')[0]}"
    assert config["muse_model"] == spec

    ours, _ = load_model(ckpt, torch.device("cpu"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
    ours.eval(), theirs.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 23), generator=gen)
    with torch.no_grad():
        assert next(theirs.parameters()).dtype == torch.float32
        assert torch.equal(theirs(ids).logits, ours(ids))
        assert torch.equal(theirs.double()(ids).logits, ours.double()(ids))
        expected = greedy(ours, ids[:1, :5], 4)
    made = theirs.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(made, expected)


def test_labels_give_the_next_token_loss(corpus, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(checkpoint(corpus, tmp_path, "transformer:tiny")), str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        result = model(ids, labels=ids)
        logits = result.logits.double()
    by_hand = -logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert result.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(ValueError, match="no attention mask"):
        model(ids, attention_mask=torch.tensor([[0] + [1] * 8, [1] * 9]))


def test_mistakes_are_one_line(corpus, tmp_path, capsys, monkeypatch):
    ckpt = checkpoint(corpus, tmp_path, "transformer:tiny")
    usage_error(capsys, ["export", tmp_path / "none.pt", tmp_path / "a"], "none.pt",
                "does not exist")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    usage_error(capsys, ["export", ckpt, tmp_path / "full"], "full", "not an empty folder")
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "muse.hf")
    usage_error(capsys, ["export", ckpt, tmp_path / "b"], "needs transformers", "muse[data]")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
