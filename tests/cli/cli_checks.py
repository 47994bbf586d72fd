"""What the CLI tests share: a checkpoint the trainer wrote, and the check that a user's mistake
ends in exit status 2 and one line on stderr."""

from pathlib import Path

from muse.cli import main
from muse.training.train import TrainConfig, train


def usage_error(capsys, argv, *words) -> str:
    """main(argv) exits 2 with one line on stderr, `muse <command>: …`, holding every word, and
    no traceback; → that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"muse {argv[0]}: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def tiny_checkpoint(root: Path, spec: str = "transformer:tiny", steps: int = 1) -> Path:
    """final.pt of `spec` trained `steps` steps on a few lines of text (bytes tokenizer)."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.txt").write_text("the cat sat on the mat . " * 30)
    train(TrainConfig(model=spec, corpus=str(corpus), tokenizer="bytes", seq_len=16,
                      batch_size=2, steps=steps, eval_tokens=64, out_dir=str(root / "run"),
                      device="cpu", progress=False))
    return root / "run" / "final.pt"
