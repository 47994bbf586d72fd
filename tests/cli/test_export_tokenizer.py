"""`muse export` writes the run's tokenizer beside the model: `AutoTokenizer.from_pretrained`
gives exactly muse's ids (bytes: the UTF-8 bytes; bpe: the byte-level BPE trained on the
corpus), decodes them back losslessly, and the exported model's logits on them are muse's.
A tokenizer that cannot be rebuilt as the run had it (corpus gone, corpus changed, hash not
the checkpoint's) is refused: one line, exit 2, nothing written."""

import shutil

import pytest
import torch

from muse.cli import main
from muse.training import data
from muse.training.evaluate import load_model
from muse.training.train import TrainConfig, train

from .cli_checks import usage_error

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
import muse.hf  # noqa: E402  (registers the families with the Auto classes)

TEXTS = [
    "the cat sat on the mat .",
    "  two  spaces , a tab\tand a newline\n ; punctuation ! ? .. ...",
    "non-ASCII: naïve café, Größe, ½ — «ключ» 日本語 🙂🐈 \x00\x7f\u00ff",
]
WORDS = ("the cat sat on a mat . a dog ran to the park , then the cat ran after it . "
         "naïve cafés serve crème brûlée ; 日本 の 猫 🙂 ").split()


def corpus_text(seed: int, lines: int = 60) -> str:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (lines, 12), generator=gen).tolist()
    return "".join(" ".join(WORDS[i] for i in row) + "\n" for row in picks)


def write_corpus(folder, seed=0):
    folder.mkdir(parents=True)
    for i, split in enumerate(("train", "valid", "test")):
        (folder / f"{split}.txt").write_text(corpus_text(seed + 10 * i), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run per tokenizer, trained a couple of steps; the BPE cache in a tmp folder."""
    root = tmp_path_factory.mktemp("runs")
    corpus = write_corpus(root / "corpus")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "DEFAULT_CACHE_DIR", root / "cache")
        ckpts = {}
        for tok in ("bytes", "bpe:300"):
            out = root / tok.replace(":", "-")
            train(TrainConfig(model="transformer:tiny", corpus=str(corpus), tokenizer=tok,
                              seq_len=16, batch_size=2, steps=2, eval_tokens=64,
                              out_dir=str(out), device="cpu", progress=False))
            ckpts[tok] = out / "final.pt"
        yield {"corpus": corpus, "cache": root / "cache", "ckpt": ckpts}


@pytest.fixture
def cache(runs, monkeypatch):
    """The BPE cache the runs wrote (a test may empty it: tests then use a copy)."""
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", runs["cache"])
    return runs["cache"]


def test_the_bytes_backend_gives_the_utf8_bytes():
    alphabet = muse.hf.byte_alphabet()
    assert len(set(alphabet)) == 256
    assert set(alphabet) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend = muse.hf.bytes_backend()
    assert backend.get_vocab_size() == 256
    every_byte = bytes(range(256)).decode("latin-1")
    for text in [*TEXTS, every_byte, "", " ", "\n\n", "a" * 1000]:
        ids = backend.encode(text).ids
        assert ids == list(text.encode("utf-8")), text
        assert backend.decode(ids) == text


@pytest.mark.parametrize("name", ["bytes", "bpe:300"])
def test_autotokenizer_gives_muses_ids_and_the_same_logits(runs, cache, tmp_path, capsys, name):
    out = tmp_path / "hf"
    assert main(["export", str(runs["ckpt"][name]), str(out)]) == 0
    assert "AutoTokenizer.from_pretrained" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()

    ours = data.get_tokenizer(name, data.load_corpus(runs["corpus"]))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == ours.vocab_size
    assert tok.eos_token_id is None and tok.pad_token_id is None  # nothing added
    test_split = (runs["corpus"] / "test.txt").read_text(encoding="utf-8")
    for text in [*TEXTS, test_split]:
        ids = tok(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert tok.decode(ids) == text
    if name == "bytes":
        assert tok(TEXTS[2])["input_ids"] == list(TEXTS[2].encode("utf-8"))
    else:  # the merges are used: some ids past the 256 bytes
        assert max(tok(test_split)["input_ids"]) >= 256

    model, _ = load_model(runs["ckpt"][name], torch.device("cpu"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
    model.eval(), theirs.eval()
    batch = tok(TEXTS[2], return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        assert torch.equal(theirs(**batch).logits, model(batch["input_ids"]))
        made = theirs.generate(**tok("the cat", return_tensors="pt"), max_new_tokens=5,
                               do_sample=False)
        ids = torch.tensor([ours.encode("the cat")])
        for _ in range(5):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(made, ids)
    assert isinstance(tok.decode(made[0]), str)


def test_a_moved_corpus_is_named_and_found_with_corpus(runs, tmp_path, capsys, monkeypatch):
    ckpt = runs["ckpt"]["bpe:300"]
    old = tmp_path / "corpus"
    shutil.copytree(runs["corpus"], old)
    # the run's config names runs["corpus"]: point it at a copy that then moves
    moved_ckpt = tmp_path / "final.pt"
    saved = torch.load(ckpt, weights_only=False)
    saved["config"]["corpus"] = str(old)
    torch.save(saved, moved_ckpt)
    moved = tmp_path / "elsewhere"
    old.rename(moved)

    # the BPE cache holds it by the recorded corpus hash: no corpus needed
    assert main(["export", str(moved_ckpt), str(tmp_path / "cached")]) == 0
    capsys.readouterr()
    # an empty cache: the tokenizer is retrained on the corpus, which is gone
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", tmp_path / "empty-cache")
    usage_error(capsys, ["export", moved_ckpt, tmp_path / "a"], str(old), "does not exist",
                "bpe:300", "--corpus PATH")
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    assert main(["export", str(moved_ckpt), str(out), "--corpus", str(moved)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = data.get_tokenizer("bpe:300", data.load_corpus(moved))
    assert tok(TEXTS[0])["input_ids"] == ours.encode(TEXTS[0])


def test_a_tokenizer_of_another_hash_is_refused(runs, cache, tmp_path, capsys):
    # bpe retrained on another corpus: other merges
    other = write_corpus(tmp_path / "other", seed=7)
    (other / "train.txt").write_text("zebra quagga okapi " * 200, encoding="utf-8")
    usage_error(capsys, ["export", runs["ckpt"]["bpe:300"], tmp_path / "a", "--corpus", other],
                "bpe:300", "hashes to", str(other), "--corpus PATH")
    # a checkpoint whose record is not the bytes tokenizer's
    saved = torch.load(runs["ckpt"]["bytes"], weights_only=False)
    saved["tokenizer"]["sha256"] = "0" * 64
    bad = tmp_path / "bad.pt"
    torch.save(saved, bad)
    usage_error(capsys, ["export", bad, tmp_path / "b"], "'bytes'", "000000000000", "hashes to")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
