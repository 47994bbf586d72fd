"""`muse eval` on a checkpoint the trainer wrote."""

import json

import pytest
import torch

from muse.cli import main
from muse.measure.perplexity import evaluate_perplexity, scored_bytes
from muse.training.data import get_tokenizer, load_corpus
from muse.training.evaluate import evaluate_checkpoint, load_model
from muse.training.train import TrainConfig, train


@pytest.fixture
def trained(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, text in {
        "train": "the cat sat on the mat . " * 200,
        "valid": "the dog sat on the rug . " * 20,
        "test": "a cat ran to the mat . " * 20,
    }.items():
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")
    cfg = TrainConfig(
        model="transformer:tiny",
        model_overrides={"vocab_size": 256},
        corpus=str(folder),
        tokenizer="bytes",
        seq_len=32,
        batch_size=2,
        steps=6,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        eval_every=3,
        eval_tokens=256,
        out_dir=str(tmp_path / "run"),
        device="cpu",
        progress=False,
    )
    train(cfg)
    return tmp_path / "run" / "final.pt", folder


def test_checkpoint_perplexity_equals_a_direct_evaluation(trained):
    ckpt, folder = trained
    result = evaluate_checkpoint(ckpt, split="test", context=32, stride=16, device="cpu")
    model, _ = load_model(ckpt, torch.device("cpu"))
    tok = get_tokenizer("bytes", corpus=load_corpus(str(folder)))
    ids = torch.tensor(tok.encode(load_corpus(str(folder)).splits["test"]))
    direct = evaluate_perplexity(model, ids, scored_bytes(tok, ids), 32, 16)
    assert result["ppl"] == pytest.approx(direct.ppl, rel=1e-12)
    assert result["tokens_scored"] == ids.numel() - 1
    assert 1.0 < result["ppl"] < 256.0  # trained: better than uniform over bytes


def test_cli_prints_json_and_rejects_a_bad_split(trained, capsys):
    ckpt, _ = trained
    assert main(["eval", str(ckpt), "--device", "cpu", "--context", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "test" and out["bits_per_byte"] > 0
    assert main(["eval", str(ckpt), "--device", "cpu", "--split", "dev"]) == 2
    assert "unknown split 'dev'" in capsys.readouterr().err
