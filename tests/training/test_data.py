"""muse.training.data: corpora and tokenizers (CPU, no network: gpt2/wikitext only through their
offline error paths)."""

import random

import pytest

from muse.errors import MuseError
from muse.training import data
from muse.training.data import (
    Corpus,
    CorpusUnavailable,
    TokenizerUnavailable,
    check_vocab,
    get_tokenizer,
    load_corpus,
)


def sample_text(n_lines=400, seed=0):
    rng = random.Random(seed)
    words = [
        "the", "river", "flows", "north", "and", "city", "walls", "were", "built", "in",
        "century", "stone", "king", "naïve", "café", "Zürich", "東京", "über", "ε", "—",
        "museum", "garden", "bridge", "harbour", "1842", "of", "by", "a", "was", "is",
    ]  # fmt: skip
    return "".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + ".\n"
        for _ in range(n_lines)
    )


def corpus_of(text):
    return Corpus("sample", {"train": text, "valid": text[:200], "test": text[200:400]})


def write_folder(path, splits):
    path.mkdir()
    for name, text in splits.items():
        (path / f"{name}.txt").write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ corpora


def test_folder_corpus(tmp_path):
    splits = {"train": "train text\nmore\n", "valid": "valid ü\n", "test": "test 東京\n"}
    folder = write_folder(tmp_path / "mini", splits)
    corpus = load_corpus(folder)
    assert corpus.name == "mini"
    assert corpus.splits == splits
    assert len(corpus.sha256) == 64
    assert load_corpus(str(folder)).sha256 == corpus.sha256
    (folder / "test.txt").write_text("changed\n", encoding="utf-8")
    assert load_corpus(folder).sha256 != corpus.sha256


def test_hash_sees_split_boundaries():
    a = Corpus("a", {"train": "ab", "valid": "c", "test": "d"})
    b = Corpus("b", {"train": "a", "valid": "bc", "test": "d"})
    assert a.sha256 != b.sha256


def test_single_file_corpus_split_90_5_5(tmp_path):
    lines = [f"line {i}\n" for i in range(100)]
    path = tmp_path / "book.txt"
    path.write_text("".join(lines), encoding="utf-8")
    corpus = load_corpus(path)
    assert corpus.name == "book"
    assert corpus.splits["train"] == "".join(lines[:90])
    assert corpus.splits["valid"] == "".join(lines[90:95])
    assert corpus.splits["test"] == "".join(lines[95:])
    assert load_corpus(path).sha256 == corpus.sha256


def test_single_file_small_and_too_small(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("a\nb\nc\nd\n", encoding="utf-8")
    splits = load_corpus(path).splits
    assert splits == {"train": "a\nb\n", "valid": "c\n", "test": "d\n"}
    path.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 3 lines"):
        load_corpus(path)


def test_missing_folder_or_file(tmp_path):
    with pytest.raises(MuseError, match="nope.*train.txt"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(MuseError, match="missing.txt"):
        load_corpus(tmp_path / "missing.txt")


def test_folder_without_splits(tmp_path):
    folder = write_folder(tmp_path / "half", {"train": "x\n"})
    with pytest.raises(MuseError, match="valid.txt, test.txt"):
        load_corpus(folder)


def test_non_utf8_file_is_named_with_its_byte_offset(tmp_path):
    folder = write_folder(tmp_path / "c", {"train": "x\n", "valid": "y\n", "test": "z\n"})
    (folder / "valid.txt").write_bytes("héllo\n".encode() + b"ab\xffcd\n")
    with pytest.raises(MuseError, match=r"valid\.txt' is not UTF-8 text: byte 0xff at byte "
                       r"offset 9 \(invalid start byte\)"):
        load_corpus(folder)


def test_unknown_spec_and_non_txt(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus 'wikitext-7'.*wikitext-103.*folder"):
        load_corpus("wikitext-7")
    path = tmp_path / "data.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a .txt file"):
        load_corpus(path)


def test_wikitext_offline_error_names_local_option(monkeypatch):
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusUnavailable) as info:
        load_corpus("wikitext-2")
    message = str(info.value)
    assert "'wikitext-2'" in message and "no network" in message
    assert "train.txt" in message and "wiki-mini" in message
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    assert isinstance(info.value, ValueError)


def test_wikitext_through_datasets(monkeypatch):
    import datasets

    fake = {
        "train": {"text": [" = A = \n", " train line \n"]},
        "validation": {"text": [" valid \n"]},
        "test": {"text": [" test \n"]},
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    corpus = load_corpus("wikitext-103")
    assert corpus.name == "wikitext-103"
    assert corpus.splits == {"train": " = A = \n train line \n", "valid": " valid \n",
                             "test": " test \n"}  # fmt: skip


# --------------------------------------------------------------------------------- tokenizers


def test_bytes_round_trip():
    tok = get_tokenizer("bytes")
    text = "plain ASCII, naïve café, 東京, emoji 🙂\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.byte_count(ids) == len(text.encode("utf-8"))
    assert len(tok.sha256) == 64 and get_tokenizer("bytes").sha256 == tok.sha256


@pytest.mark.parametrize("name", ["bpe:abc", "bpe:0", "bpe:256", "bpe:", "foo", "BYTES", "gpt-2"])
def test_bad_tokenizer_names(name):
    with pytest.raises(ValueError, match=f"{name!r}.*bytes.*gpt2.*bpe:<vocab>"):
        get_tokenizer(name, corpus_of("x\n"))


def test_bpe_needs_corpus():
    with pytest.raises(ValueError, match="corpus"):
        get_tokenizer("bpe:300")


def test_gpt2_offline_error(monkeypatch):
    import transformers

    class Offline:
        @staticmethod
        def from_pretrained(name, *args, **kwargs):
            raise OSError(f"We couldn't connect to load {name}")

    monkeypatch.setattr(transformers, "AutoTokenizer", Offline)
    with pytest.raises(TokenizerUnavailable) as info:
        get_tokenizer("gpt2")
    message = str(info.value)
    assert "'gpt2'" in message and "couldn't connect" in message
    assert "'bytes'" in message and "bpe:<vocab>" in message
    assert isinstance(info.value, ValueError)


def test_bpe_trains_to_vocab_and_round_trips(tmp_path):
    text = sample_text()
    corpus = corpus_of(text)
    tok = get_tokenizer("bpe:320", corpus, cache_dir=tmp_path)
    # tokenizers' BpeTrainer: vocab_size counts the 256-byte alphabet and the merges; it stops
    # early only when no pair is left to merge, which a few KB of varied text never reaches.
    assert tok.name == "bpe:320" and tok.vocab_size == 320
    for sample in (text[:500], "unseen words: Ωmega ß 🙂 \n\n  spaces"):
        ids = tok.encode(sample)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == sample
        assert tok.byte_count(ids) == len(sample.encode("utf-8"))
    assert len(tok.encode(text)) < len(text.encode("utf-8")) * 0.6  # it did learn merges


def test_bpe_cache_hit_does_not_retrain(tmp_path, monkeypatch):
    corpus = corpus_of(sample_text())
    first = get_tokenizer("bpe:300", corpus, cache_dir=tmp_path)
    cached = list(tmp_path.iterdir())
    assert [p.name for p in cached] == [data.bpe_cache_path(tmp_path, corpus, 300).name]
    mtime = cached[0].stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained instead of loading the cache")

    monkeypatch.setattr(data, "train_bpe", no_training)
    second = get_tokenizer("bpe:300", corpus, cache_dir=tmp_path)
    assert second.sha256 == first.sha256 and second.vocab_size == first.vocab_size
    assert second.encode("the river flows") == first.encode("the river flows")
    assert cached[0].stat().st_mtime_ns == mtime
    # another vocab size or another corpus is another cache entry (and must train)
    with pytest.raises(AssertionError, match="retrained"):
        get_tokenizer("bpe:310", corpus, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="retrained"):
        get_tokenizer("bpe:300", corpus_of(sample_text(seed=1)), cache_dir=tmp_path)


def test_bpe_hash_is_of_serialized_json(tmp_path):
    import hashlib

    corpus = corpus_of(sample_text())
    tok = get_tokenizer("bpe:300", corpus, cache_dir=tmp_path)
    path = data.bpe_cache_path(tmp_path, corpus, 300)
    assert tok.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_check_vocab():
    tok = get_tokenizer("bytes")
    check_vocab(256, tok)
    with pytest.raises(ValueError, match="512.*'bytes'.*256"):
        check_vocab(512, tok)


def test_encoded_split_is_cached_and_equals_encode(tmp_path):
    import torch

    from muse.training.data import Corpus, bytes_tokenizer, encoded_split

    corpus = Corpus("c", {"train": "héllo wörld " * 50, "valid": "ab", "test": "cd"})
    tok = bytes_tokenizer()
    first = encoded_split(tok, corpus, "train", cache_dir=tmp_path)
    assert first.tolist() == tok.encode(corpus.splits["train"])
    assert len(list(tmp_path.glob("ids-*-train.npy"))) == 1
    again = encoded_split(tok, corpus, "train", cache_dir=tmp_path)
    assert again.dtype == torch.long and torch.equal(again, first)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        encoded_split(tok, corpus, "dev", cache_dir=tmp_path)


# --- the held-out splits ----------------------------------------------------------------------
# valid and test are made of characters train never has, so a token of theirs is a sign of
# where it was read from


def held_out_corpus(train_text):
    return Corpus("held-out", {"train": train_text,
                               "valid": "QXQXQX QXQX VQXV.\n" * 40,
                               "test": "JKJK WJW KKJW.\n" * 40})


def test_bpe_is_fitted_on_the_train_split_only(tmp_path, monkeypatch):
    train_text = sample_text()
    corpus = held_out_corpus(train_text)
    fitted = []
    real = data.train_bpe
    monkeypatch.setattr(data, "train_bpe", lambda text, vocab: fitted.append(text) or real(
        text, vocab))
    tok = get_tokenizer("bpe:300", corpus, cache_dir=tmp_path / "a")
    assert fitted == [train_text]
    # no merge learned from valid or test: their words stay one token per byte
    for split in ("valid", "test"):
        word = corpus.splits[split].split()[0]
        assert len(tok.encode(word)) == len(word.encode("utf-8")), split
    # other valid and test text, the same train text: the very same tokenizer
    other = Corpus("other", {**corpus.splits, "valid": "QQQQ XXXX.\n" * 50, "test": "JJJ.\n"})
    assert other.sha256 != corpus.sha256
    assert get_tokenizer("bpe:300", other, cache_dir=tmp_path / "b").sha256 == tok.sha256


def test_the_trainer_trains_on_train_validates_on_valid_and_never_reads_test(tmp_path,
                                                                             monkeypatch):
    """Every input the model sees while the trainer runs, whatever the encoded-split cache
    holds (a cold run, then a run that reads the cache)."""
    import muse.training.train
    from muse import models

    corpus_dir = tmp_path / "corpus"
    write_folder(corpus_dir, held_out_corpus(sample_text(seed=3)).splits)
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", tmp_path / "cache")
    valid_only = set(b"QXV")
    test_only = set(b"JKW")
    seen = {"train": set(), "eval": set()}
    real_build = models.build

    def build(*args, **kw):
        model = real_build(*args, **kw)
        model.register_forward_pre_hook(lambda module, inputs: seen[
            "train" if module.training else "eval"].update(inputs[0].flatten().tolist()))
        return model

    monkeypatch.setattr(models, "build", build)
    for run in ("cold", "cached"):
        cfg = muse.training.train.TrainConfig(
            model="transformer:tiny", corpus=str(corpus_dir), tokenizer="bytes", seq_len=16,
            batch_size=4, steps=12, warmup_steps=1, eval_every=4, eval_tokens=4096,
            out_dir=str(tmp_path / run), device="cpu", progress=False)
        muse.training.train.train(cfg)
        assert list((tmp_path / "cache").glob("ids-*-train.npy"))
        assert not list((tmp_path / "cache").glob("ids-*-test.npy"))
        assert seen["train"] and not seen["train"] & (valid_only | test_only), run
        assert valid_only <= seen["eval"] and not seen["eval"] & test_only, run
