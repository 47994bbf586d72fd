"""`muse train` on a user's mistake: exit status 2, one line on stderr naming the bad value, and
nothing written (no out_dir)."""

import os
import shutil

import pytest
import torch

from muse.cli import main

from .cli_checks import usage_error

TEXT = "the cat sat on the mat and the dog ran to the park . " * 40


def write_corpus(folder, **splits):
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        data = splits.get(split, TEXT)
        path = folder / f"{split}.txt"
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return folder


def write_config(path, corpus, out, **values):
    values = {"model": "transformer:tiny", "corpus": str(corpus), "tokenizer": "bytes",
              "seq_len": 16, "batch_size": 2, "steps": 2, "eval_every": 0, "eval_tokens": 64,
              "device": "cpu", "progress": False, "out_dir": str(out), **values}
    lines = [f"{k} = {v!r}".replace("True", "true").replace("False", "false")
             for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def setup(tmp_path):
    return write_corpus(tmp_path / "corpus"), tmp_path / "out"


def test_a_missing_or_unreadable_config_file(tmp_path, capsys):
    usage_error(capsys, ["train", tmp_path / "none.toml"], "none.toml", "does not exist")
    usage_error(capsys, ["train", tmp_path], "does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"steps = \xff\n")
    usage_error(capsys, ["train", bad], "bad.toml", "not a TOML config")


@pytest.mark.parametrize("corpus, words", [
    ("./no-such-corpus", ["'./no-such-corpus' does not exist", "train.txt"]),
    ("wikitext-7", ["unknown corpus 'wikitext-7'"]),
])
def test_a_corpus_that_is_not_there(tmp_path, capsys, corpus, words):
    out = tmp_path / "out"
    usage_error(capsys, ["train", write_config(tmp_path / "c.toml", corpus, out)], *words)
    assert not out.exists()


def test_a_corpus_folder_missing_a_split(tmp_path, capsys):
    folder = write_corpus(tmp_path / "half")
    (folder / "test.txt").unlink()
    out = tmp_path / "out"
    usage_error(capsys, ["train", write_config(tmp_path / "c.toml", folder, out)],
                "half", "lacks test.txt")
    assert not out.exists()


@pytest.mark.parametrize("splits, words", [
    ({"train": "", "valid": "", "test": ""}, ["train split", "has 0 bytes tokens",
                                              "seq_len=16"]),
    ({"train": "too short"}, ["has 9 bytes tokens, fewer than seq_len=16"]),
    ({"valid": "x"}, ["valid split", "has 1 bytes token(s)", "at least 2"]),
    ({"valid": b"ok\n\xc3\x28\n"}, ["valid.txt' is not UTF-8 text", "byte 0xc3 at byte offset 3"]),
])
def test_an_empty_short_or_non_utf8_corpus(tmp_path, capsys, splits, words):
    folder = write_corpus(tmp_path / "corpus", **splits)
    out = tmp_path / "out"
    usage_error(capsys, ["train", write_config(tmp_path / "c.toml", folder, out)], *words)
    assert not out.exists()


@pytest.mark.parametrize("tokenizer", ["wordpiece", "bpe:10", "bpe:x"])
def test_an_unknown_tokenizer(setup, tmp_path, capsys, tokenizer):
    corpus, out = setup
    usage_error(capsys, ["train", write_config(tmp_path / "c.toml", corpus, out,
                                               tokenizer=tokenizer)],
                f"tokenizer {tokenizer!r}", "bpe:<vocab>")
    assert not out.exists()


def test_gpt2_offline(setup, tmp_path, capsys, monkeypatch):
    import transformers

    class Offline:
        @staticmethod
        def from_pretrained(name, *args, **kwargs):
            raise OSError(f"We couldn't connect to load {name}.\nCheck your connection.")

    monkeypatch.setattr(transformers, "AutoTokenizer", Offline)
    corpus, out = setup
    usage_error(capsys, ["train", write_config(tmp_path / "c.toml", corpus, out,
                                               tokenizer="gpt2")],
                "tokenizer 'gpt2' could not be loaded", "couldn't connect", "bpe:<vocab>")
    assert not out.exists()


@pytest.mark.parametrize("override, words", [
    ("model_overrides.bogus=1", ["'bogus'", "valid keys", "d_model"]),
    ("model_overrides.dropout='x'", ["model_overrides.dropout must be a number, got 'x'"]),
    ("model_overrides.n_layers=true", ["model_overrides.n_layers must be an integer, got True"]),
    ("model_overrides.n_layers=0", ["n_layers must be a positive integer, got 0"]),
    ("model_overrides.d_model=-8", ["d_model must be a positive integer, got -8"]),
    ("model_overrides.vocab_size=300", ["vocab_size 300 does not match tokenizer 'bytes'",
                                        "256"]),
    ("model=transformer:huge", ["unknown preset 'huge'"]),
    ("eval_tokens=1", ["eval_tokens must be ≥ 2", "got 1"]),
])
def test_bad_model_overrides_and_values(setup, tmp_path, capsys, override, words):
    corpus, out = setup
    usage_error(capsys, ["train", write_config(tmp_path / "c.toml", corpus, out), "--set",
                         override], *words)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_cuda_without_cuda(setup, tmp_path, capsys):
    corpus, out = setup
    usage_error(capsys, ["train", write_config(tmp_path / "c.toml", corpus, out,
                                               device="cuda")],
                "device 'cuda'", "CUDA is not available")
    assert not out.exists()


def test_an_out_dir_that_cannot_be_made(setup, tmp_path, capsys):
    corpus, _ = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    usage_error(capsys, ["train", write_config(tmp_path / "c.toml", corpus, blocker / "out")],
                "a-file/out", "cannot be created", "Not a directory")
    usage_error(capsys, ["train", write_config(tmp_path / "c.toml", corpus, blocker)],
                "a-file", "is a file")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs")
def test_an_out_dir_where_not_even_root_may_write(setup, tmp_path, capsys):
    corpus, _ = setup
    usage_error(capsys, ["train", write_config(tmp_path / "c.toml", corpus, "/sys/muse-out")],
                "'/sys/muse-out' cannot be created")
    assert not os.path.exists("/sys/muse-out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_an_unwritable_out_dir(setup, tmp_path, capsys):
    corpus, _ = setup
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        usage_error(capsys, ["train", write_config(tmp_path / "c.toml", corpus,
                                                   locked / "run" / "out")],
                    "locked/run/out", "cannot be created", "Permission denied")
        locked.chmod(0o700)
        (locked / "run").mkdir(mode=0o500)
        usage_error(capsys, ["train", write_config(tmp_path / "c.toml", corpus, locked / "run")],
                    "locked/run", "not writable")
        assert list(locked.iterdir()) == [locked / "run"] and not any((locked / "run").iterdir())
    finally:
        for p in (locked / "run", locked):
            if p.exists():
                p.chmod(0o700)


# ---------------------------------------------------------------------------- --resume


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus")
    cfg = write_config(root / "run.toml", corpus, root / "run", steps=2)
    assert main(["train", str(cfg)]) == 0
    return root, corpus, cfg, root / "run" / "final.pt"


def test_resume_from_a_bad_checkpoint(trained, tmp_path, capsys):
    root, corpus, cfg, final = trained
    data = final.read_bytes()
    cases = {
        "truncated.pt": (data[: len(data) // 2], "not a complete checkpoint"),
        "empty.pt": (b"", "not a complete checkpoint"),
        "text.pt": (b"hello\n", "not a complete checkpoint"),
    }
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside a tensor: only a checksum sees it
    cases["flipped.pt"] = (bytes(flipped), "is corrupted")
    for name, (content, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        out = tmp_path / f"out-{name}"
        usage_error(capsys, ["train", cfg, "--set", f"out_dir='{out}'", "--resume", path],
                    name, words)
        assert not out.exists()
    torch.save({"a": 1}, tmp_path / "foreign.pt")
    usage_error(capsys, ["train", cfg, "--resume", tmp_path / "foreign.pt"],
                "foreign.pt", "not a muse training checkpoint", "lacks model")
    torch.save(torch.load(final, weights_only=False)["model"], tmp_path / "weights.pt")
    usage_error(capsys, ["train", cfg, "--resume", tmp_path / "weights.pt"],
                "weights.pt", "a bare state_dict", "lacks model, optimizer")
    usage_error(capsys, ["train", cfg, "--resume", tmp_path], "is a directory")
    usage_error(capsys, ["train", cfg, "--resume", tmp_path / "none.pt"], "does not exist")


def test_resume_with_a_config_that_does_not_match(trained, tmp_path, capsys):
    _, _, cfg, final = trained
    out = tmp_path / "out"
    usage_error(capsys, ["train", cfg, "--set", "seq_len=8", "--set", f"out_dir='{out}'",
                         "--resume", final],
                "cannot resume", "seq_len (16 there, 8 here)")
    assert not out.exists()


def test_a_used_out_dir_needs_resume_or_overwrite(trained, tmp_path, capsys):
    root, corpus, cfg, final = trained
    out = tmp_path / "used"
    shutil.copytree(root / "run", out)
    (out / "step-000099.pt").write_bytes(b"an older run's")
    before = sorted(p.name for p in out.iterdir())
    usage_error(capsys, ["train", cfg, "--set", f"out_dir='{out}'"],
                "already holds a run", "--resume", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == before
    usage_error(capsys, ["train", cfg, "--set", f"out_dir='{out}'", "--overwrite", "--resume",
                         final], "exclude each other")
    assert main(["train", str(cfg), "--set", f"out_dir='{out}'", "--overwrite"]) == 0
    # the old run's files are gone, not mixed with the new ones
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "final.pt", "history.json",
                                                     "run.json"]
    assert main(["train", str(cfg), "--set", f"out_dir='{out}'", "--set", "steps=3",
                 "--resume", str(out / "final.pt")]) == 0
    assert torch.load(out / "final.pt", weights_only=False)["step"] == 3
