"""Corpora and tokenizers for the quality criterion.

`load_corpus(spec)` gives a `Corpus` (train/valid/test text and a hash of it) from a local folder
with `train.txt`, `valid.txt`, `test.txt`, a single `.txt` file (split 90/5/5 by lines), or
`wikitext-2` / `wikitext-103` through `datasets` (online or from the HF cache).

`get_tokenizer(name, corpus)` gives a `Tokenizer` (name, vocab_size, sha256, encode, decode):
`bytes` (UTF-8 bytes), `gpt2` (transformers) or `bpe:<vocab>` (byte-level BPE trained with the
`tokenizers` library on the corpus train split, cached on disk by corpus hash and vocab size).
Every tokenizer here is lossless and byte-level: each token stands for a fixed byte string, so
`Tokenizer.byte_count(ids)` is the exact number of UTF-8 bytes a run of tokens stands for.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muse.errors import MuseError
from muse.extras import needs
from muse.fileio import atomic_write_bytes, atomic_write_text

SPLITS = ("train", "valid", "test")
WIKITEXT = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
DEFAULT_CACHE_DIR = Path("~/.cache/muse/tokenizers")
TOKENIZER_FORMS = "'bytes', 'gpt2' or 'bpe:<vocab>' (an integer vocab size >= 257, e.g. bpe:8192)"
CORPUS_FORMS = (
    "'wikitext-2', 'wikitext-103', a folder with train.txt, valid.txt and test.txt "
    "(e.g. ../shared/data/wiki-mini), or a single .txt file (split 90/5/5 by lines)"
)


class CorpusUnavailable(MuseError):
    """A named corpus that cannot be had here (no network and no cache)."""


class TokenizerUnavailable(MuseError):
    """A named tokenizer that cannot be had here (no network and no cache)."""


# ----------------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    name: str
    splits: dict[str, str]
    sha256: str = field(default="")

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise MuseError(f"corpus {self.name!r} lacks split(s) {missing}; a corpus has "
                            f"{', '.join(SPLITS)}")
        if not self.sha256:
            self.sha256 = corpus_hash(self.splits)


def corpus_hash(splits: dict[str, str]) -> str:
    """SHA-256 of the splits concatenated in the order train, valid, test; each split is
    preceded by its name and UTF-8 length so that moving text between splits changes it."""
    h = hashlib.sha256()
    for name in SPLITS:
        data = splits[name].encode("utf-8")
        h.update(f"{name}:{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def load_corpus(spec: str | os.PathLike) -> Corpus:
    """Load a corpus by spec: 'wikitext-2', 'wikitext-103', a folder or a .txt file."""
    text_spec = os.fspath(spec)
    if text_spec in WIKITEXT:
        return _load_wikitext(text_spec)
    path = Path(text_spec).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        if path.suffix != ".txt":
            raise MuseError(f"corpus file {text_spec!r} is not a .txt file; valid: {CORPUS_FORMS}")
        return _load_file(path)
    if path.suffix == ".txt" or os.sep in text_spec or text_spec.startswith("."):
        raise MuseError(f"corpus {text_spec!r} does not exist; valid: {CORPUS_FORMS}")
    raise MuseError(f"unknown corpus {text_spec!r}; valid: {CORPUS_FORMS}")


def _read(path: Path) -> str:
    # bytes decoded in one piece, so a decoding error's offset is the file's byte offset
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MuseError(f"cannot read corpus file {str(path)!r}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MuseError(
            f"corpus file {str(path)!r} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte "
            f"offset {e.start} ({e.reason}); a corpus is UTF-8 text"
        ) from None


def _load_folder(path: Path) -> Corpus:
    missing = [f"{s}.txt" for s in SPLITS if not (path / f"{s}.txt").is_file()]
    if missing:
        raise MuseError(
            f"corpus folder {str(path)!r} lacks {', '.join(missing)}; a corpus folder holds "
            "train.txt, valid.txt and test.txt"
        )
    return Corpus(path.name, {s: _read(path / f"{s}.txt") for s in SPLITS})


def split_lines(text: str) -> dict[str, str]:
    """Split text by lines into train/valid/test, 90/5/5, in order (deterministic): valid and
    test get 5% of the lines each (at least one), train the rest (the first lines)."""
    lines = text.splitlines(keepends=True)
    n = len(lines)
    if n < 3:
        raise MuseError(f"a single-file corpus needs at least 3 lines to split, got {n}")
    n_valid = max(1, n * 5 // 100)
    n_test = max(1, n * 5 // 100)
    n_train = n - n_valid - n_test
    return {
        "train": "".join(lines[:n_train]),
        "valid": "".join(lines[n_train : n_train + n_valid]),
        "test": "".join(lines[n_train + n_valid :]),
    }


def _load_file(path: Path) -> Corpus:
    try:
        splits = split_lines(_read(path))
    except MuseError as e:
        raise MuseError(f"corpus file {str(path)!r}: {e}") from None
    return Corpus(path.stem, splits)


def _load_wikitext(spec: str) -> Corpus:
    with needs(f"corpus {spec!r}"):
        import datasets
    try:
        ds = datasets.load_dataset("wikitext", WIKITEXT[spec])
        splits = {
            "train": "".join(ds["train"]["text"]),
            "valid": "".join(ds["validation"]["text"]),
            "test": "".join(ds["test"]["text"]),
        }
    except Exception as e:
        raise CorpusUnavailable(
            f"corpus {spec!r} could not be loaded through datasets (no network and no HF "
            f"cache?): {type(e).__name__}: {e}. For offline runs pass a local corpus: a folder "
            "with train.txt, valid.txt and test.txt, such as ../shared/data/wiki-mini"
        ) from e
    return Corpus(spec, splits)


# -------------------------------------------------------------------------------- tokenizers


@dataclass
class Tokenizer:
    """A lossless tokenizer: `decode(encode(text)) == text`. `byte_lengths[i]` is the number of
    bytes token i stands for, so `byte_count(ids)` is the UTF-8 size of the text of `ids`."""

    name: str
    vocab_size: int
    sha256: str
    byte_lengths: list[int]
    _encode: Callable[[str], list[int]] = field(repr=False)
    _decode: Callable[[Sequence[int]], str] = field(repr=False)
    backend: Any = field(default=None, repr=False, compare=False)  # its `tokenizers.Tokenizer`

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])

    def byte_count(self, ids: Sequence[int]) -> int:
        """UTF-8 bytes the tokens `ids` stand for (exact: each token is a fixed byte string)."""
        lengths = self.byte_lengths
        return sum(lengths[int(i)] for i in ids)


def check_vocab(model_vocab_size: int, tokenizer: Tokenizer) -> None:
    """A model must have exactly the tokenizer's vocabulary size."""
    if model_vocab_size != tokenizer.vocab_size:
        raise MuseError(
            f"model vocab_size {model_vocab_size} does not match tokenizer {tokenizer.name!r} "
            f"vocab_size {tokenizer.vocab_size}; build the model with "
            f"vocab_size={tokenizer.vocab_size}"
        )


def parse_tokenizer_name(name: str) -> tuple[str, int | None]:
    """('bytes', None), ('gpt2', None) or ('bpe', vocab); ValueError for anything else."""
    if name in ("bytes", "gpt2"):
        return name, None
    m = re.fullmatch(r"bpe:(\d+)", name) if isinstance(name, str) else None
    if m is None:
        raise MuseError(f"unknown tokenizer {name!r}; valid: {TOKENIZER_FORMS}")
    vocab = int(m.group(1))
    if vocab < 257:
        raise MuseError(
            f"tokenizer {name!r}: bpe vocab size must be >= 257 (256 byte tokens plus at least "
            f"one merge), got {vocab}; valid: {TOKENIZER_FORMS}"
        )
    return "bpe", vocab


def get_tokenizer(
    name: str, corpus: Corpus | None = None, cache_dir: str | os.PathLike | None = None
) -> Tokenizer:
    """A tokenizer by name. `bpe:<vocab>` needs the corpus (trained on its train split) and is
    cached under `cache_dir` (default ~/.cache/muse/tokenizers) by corpus hash and vocab size."""
    kind, vocab = parse_tokenizer_name(name)
    if kind == "bytes":
        return bytes_tokenizer()
    if kind == "gpt2":
        return gpt2_tokenizer()
    if corpus is None:
        raise ValueError(f"tokenizer {name!r} is trained on a corpus: pass corpus=")
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    return bpe_tokenizer(vocab, corpus, cache)


def bytes_tokenizer() -> Tokenizer:
    return Tokenizer(
        name="bytes",
        vocab_size=256,
        sha256=hashlib.sha256(b"muse-tokenizer:bytes:utf-8").hexdigest(),
        byte_lengths=[1] * 256,
        _encode=lambda text: list(text.encode("utf-8")),
        _decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"),
    )


def _from_backend(name: str, backend, serialized: str) -> Tokenizer:
    """Wrap a `tokenizers.Tokenizer` with a byte-level model: every character of a token string
    is one byte of the byte-level alphabet, so a token's byte length is its string length."""
    vocab_size = backend.get_vocab_size()
    lengths = [0] * vocab_size
    for token, i in backend.get_vocab().items():
        if i < vocab_size:
            lengths[i] = len(token)
    return Tokenizer(
        name=name,
        vocab_size=vocab_size,
        sha256=hashlib.sha256(serialized.encode("utf-8")).hexdigest(),
        byte_lengths=lengths,
        _encode=lambda text: backend.encode(text, add_special_tokens=False).ids,
        _decode=lambda ids: backend.decode(ids, skip_special_tokens=False),
        backend=backend,
    )


def gpt2_tokenizer() -> Tokenizer:
    with needs("tokenizer 'gpt2'"):
        import transformers
    try:
        hf = transformers.AutoTokenizer.from_pretrained("gpt2")
        backend = hf.backend_tokenizer
    except Exception as e:
        raise TokenizerUnavailable(
            f"tokenizer 'gpt2' could not be loaded through transformers (no network and no HF "
            f"cache?): {type(e).__name__}: {e}. Offline, use 'bytes' or 'bpe:<vocab>' "
            "(trained on the corpus, e.g. bpe:8192)"
        ) from e
    return _from_backend("gpt2", backend, backend.to_str())


def _new_bpe():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def train_bpe(text: str, vocab_size: int):
    """Train a byte-level BPE (`tokenizers`) on `text`: the 256 byte symbols plus merges up to
    `vocab_size` tokens in all (fewer if the text runs out of pairs to merge); no special tokens.
    """
    with needs("tokenizer 'bpe:<vocab>'"):
        from tokenizers import pre_tokenizers, trainers

    backend = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    chunks = ("".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000))
    backend.train_from_iterator(chunks, trainer=trainer, length=(len(lines) + 999) // 1000)
    return backend


def bpe_cache_path(cache_dir: Path, corpus: Corpus | str, vocab_size: int) -> Path:
    """Where the BPE of `corpus` (a Corpus or its sha256) is cached."""
    sha256 = corpus if isinstance(corpus, str) else corpus.sha256
    return cache_dir / f"bpe-{vocab_size}-{sha256[:24]}.json"


def cached_bpe_tokenizer(vocab_size: int, corpus_sha256: str,
                         cache_dir: str | os.PathLike | None = None) -> Tokenizer | None:
    """The BPE cached for the corpus of hash `corpus_sha256` (the corpus itself may be gone:
    `muse export` of a run whose corpus moved), or None when the cache has none."""
    with needs(f"tokenizer 'bpe:{vocab_size}'"):
        from tokenizers import Tokenizer as Backend

    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    path = bpe_cache_path(cache, corpus_sha256, vocab_size)
    if not path.is_file():
        return None
    serialized = path.read_text(encoding="utf-8")
    return _from_backend(f"bpe:{vocab_size}", Backend.from_str(serialized), serialized)


def bpe_tokenizer(vocab_size: int, corpus: Corpus, cache_dir: Path) -> Tokenizer:
    with needs(f"tokenizer 'bpe:{vocab_size}'"):
        from tokenizers import Tokenizer as Backend

    name = f"bpe:{vocab_size}"
    path = bpe_cache_path(cache_dir, corpus, vocab_size)
    if path.is_file():
        serialized = path.read_text(encoding="utf-8")
        return _from_backend(name, Backend.from_str(serialized), serialized)
    backend = train_bpe(corpus.splits["train"], vocab_size)
    serialized = backend.to_str()
    atomic_write_text(path, serialized)
    return _from_backend(name, backend, serialized)


# --------------------------------------------------------------------------- encoded splits


def encoded_split(tokenizer: Tokenizer, corpus: Corpus, split: str,
                  cache_dir: str | os.PathLike | None = None):
    """The token ids of one split as a LongTensor, cached on disk (next to the BPE cache) by
    tokenizer hash, corpus hash and split: encoding a 45 MB train split takes ~20 s, every
    training run of a sweep needs it, and the cached ids are exactly what `encode` gives."""
    import numpy as np
    import torch

    if split not in SPLITS:
        raise MuseError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    path = cache / f"ids-{tokenizer.sha256[:16]}-{corpus.sha256[:24]}-{split}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path).astype(np.int64))
    ids = np.asarray(tokenizer.encode(corpus.splits[split]), dtype=np.int64)
    small = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    atomic_write_bytes(path, lambda f: np.save(f, ids.astype(small)))
    return torch.from_numpy(ids)
