"""Hugging Face interop: a `PretrainedConfig` and a `PreTrainedModel` wrapper per model family,
registered with `AutoConfig` and `AutoModelForCausalLM`, so that after `import muse.hf` a folder
written by `muse export` loads with `AutoModelForCausalLM.from_pretrained(folder)` and reaches
the field's tools (generate(), lm-evaluation-harness); the run's tokenizer is saved beside it
as a `PreTrainedTokenizerFast`, which `AutoTokenizer.from_pretrained(folder)` loads.

The wrapper holds the muse model as `.model`, built from the full muse config stored in
config.json; the logits are the muse model's own. There is no KV cache: generate() runs the
whole prefix at every step, and padding is refused, since the models take no attention mask.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from muse import models
from muse.errors import MuseError, one_line
from muse.extras import needs
from muse.training.data import (
    Tokenizer,
    cached_bpe_tokenizer,
    get_tokenizer,
    load_corpus,
    parse_tokenizer_name,
)

with needs("Hugging Face interop (muse.hf, muse export)"):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerFast,
    )
    from transformers.modeling_outputs import CausalLMOutput


class MuseConfig(PretrainedConfig):
    """`muse_model` is the registry spec (name:preset) and `muse_config` the family config's
    every field, so the model is rebuilt exactly whatever the presets say later."""

    model_type = "muse"
    family = ""

    def __init__(self, muse_model: str = "", muse_config: dict | None = None, **kwargs: Any):
        self.muse_model = muse_model
        self.muse_config = dict(muse_config or {})
        if "vocab_size" in self.muse_config:
            kwargs.setdefault("vocab_size", self.muse_config["vocab_size"])
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class MuseForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MuseConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: MuseConfig):
        super().__init__(config)
        fam = models.family(self.family_name())
        self.model = fam.model_cls(family_config(fam, config.muse_config))
        # muse ties inside its modules (the lm head to the embedding); HF re-ties after loading
        self._tied_weights_keys = tied_parameters(self.model, prefix="model.")
        self.post_init()
        self.generation_config.use_cache = False  # no KV cache: generate() reruns the prefix

    @classmethod
    def family_name(cls) -> str:
        return cls.config_class.family

    def _init_weights(self, module: torch.nn.Module) -> None:
        """muse's modules initialise themselves when built; loading overwrites the rest."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("muse models take no attention mask: a padded batch would be read "
                             "as text; pass unpadded sequences of one length")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:  # HF's convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: Any) -> dict:
        return {"input_ids": input_ids, "attention_mask": kwargs.get("attention_mask")}


def family_config(fam: models.registry.Family, values: dict) -> models.StrictConfig:
    """The family config from config.json's values: JSON turned its tuples into lists."""
    tuples = {f.name for f in dataclasses.fields(fam.config_cls) if isinstance(f.default, tuple)}
    return fam.config_cls.from_dict(
        {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()})


def tied_parameters(module: torch.nn.Module, prefix: str = "") -> dict[str, str]:
    """{target: source} of parameters shared under several names (the first name is the
    source), as transformers' `_tied_weights_keys` wants them."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[prefix + name] = first[id(param)]
        else:
            first[id(param)] = prefix + name
    return tied


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[-_]", name))


def _register(name: str) -> tuple[type[MuseConfig], type[MuseForCausalLM]]:
    config_cls = type(f"Muse{_camel(name)}Config", (MuseConfig,),
                      {"model_type": f"muse-{name}", "family": name, "__module__": __name__})
    model_cls = type(f"Muse{_camel(name)}ForCausalLM", (MuseForCausalLM,),
                     {"config_class": config_cls, "__module__": __name__})
    AutoConfig.register(config_cls.model_type, config_cls)
    AutoModelForCausalLM.register(config_cls, model_cls)
    globals()[config_cls.__name__] = config_cls
    globals()[model_cls.__name__] = model_cls
    return config_cls, model_cls


CLASSES = {name: _register(name) for name in models.names()}


def wrap(model: torch.nn.Module, spec: str) -> MuseForCausalLM:
    """The HF wrapper around a built muse model (its weights, not a copy's)."""
    name, preset = models.resolve(spec)
    config_cls, model_cls = CLASSES[name]
    config = config_cls(muse_model=f"{name}:{preset}", muse_config=model.config.to_dict(),
                        tie_word_embeddings=bool(tied_parameters(model)),
                        architectures=[model_cls.__name__])
    with torch.device("meta"):  # the wrapper's own copy is replaced at once
        wrapper = model_cls(config)
    wrapper.model = model
    wrapper._tied_weights_keys = tied_parameters(model, prefix="model.")
    return wrapper


def byte_alphabet() -> list[str]:
    """The byte-level alphabet (GPT-2's bytes_to_unicode): the character standing for byte b.
    Printable bytes stand for themselves; the others for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def bytes_backend() -> Backend:
    """muse's `bytes` tokenizer as a `tokenizers` one: the text's UTF-8 bytes through the
    byte-level pre-tokenizer (no regex split, no prefix space), a BPE with no merges whose
    vocabulary maps the character of byte b to id b, and the byte-level decoder."""
    vocab = {char: b for b, char in enumerate(byte_alphabet())}
    backend = Backend(tokenizer_models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A muse tokenizer as a `PreTrainedTokenizerFast` giving the very same ids. muse
    vocabularies hold no special tokens and none is added: bos, eos and pad stay unset
    (generate() stops at max_new_tokens), and decoding leaves spaces as they are."""
    if tokenizer.name == "bytes":
        backend = bytes_backend()
    elif tokenizer.backend is not None:  # a copy: the wrapper sets padding and truncation on it
        backend = Backend.from_str(tokenizer.backend.to_str())
    else:
        raise MuseError(f"tokenizer {tokenizer.name!r} has no Hugging Face form")
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                  model_input_names=["input_ids", "attention_mask"])


def run_tokenizer(ckpt: dict[str, Any], checkpoint: str | os.PathLike,
                  corpus: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer the checkpoint's run was trained with, rebuilt and checked against the
    hash it records. A `bpe:<vocab>` comes from the BPE cache by the recorded corpus hash, or
    is retrained on `corpus` (default: the corpus the run's config names); MuseError when that
    corpus is missing or the rebuilt tokenizer hashes otherwise."""
    name, want = ckpt["tokenizer"]["name"], ckpt["tokenizer"]["sha256"]
    kind, vocab = parse_tokenizer_name(name)
    where = f"checkpoint {os.fspath(checkpoint)!r}"
    hint = "pass --corpus PATH, the corpus it was trained on"
    source = ""
    if kind != "bpe":
        tokenizer = get_tokenizer(name)
    elif corpus is None and (cached := cached_bpe_tokenizer(vocab, ckpt["corpus"]["sha256"])):
        tokenizer = cached
    else:
        spec = os.fspath(corpus) if corpus is not None else ckpt["config"]["corpus"]
        source = f" from corpus {spec!r}"
        try:
            text = load_corpus(spec)
        except MuseError as e:
            why = one_line(e).partition("; valid: ")[0]  # the hint below says what to pass
            raise MuseError(f"{where}: tokenizer {name!r} is retrained on the run's corpus, but "
                            f"{why}; {hint}") from None
        tokenizer = get_tokenizer(name, text)
    if tokenizer.sha256 != want:
        raise MuseError(
            f"{where} was trained with tokenizer {name!r} of hash {want[:12]}, but the one "
            f"rebuilt{source} hashes to {tokenizer.sha256[:12]}; "
            + (hint if kind == "bpe" else "export needs the very tokenizer of the run"))
    return tokenizer


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
           corpus: str | os.PathLike | None = None) -> Path:
    """A `muse train` checkpoint → a save_pretrained folder: config.json and safetensors for
    `AutoModelForCausalLM`, tokenizer.json and tokenizer_config.json for `AutoTokenizer`.
    `corpus` is the training corpus where it moved (bpe tokenizers are retrained on it)."""
    from muse.training.evaluate import load_model

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MuseError(f"OUT_DIR {str(out)!r} exists and is not an empty folder; "
                        "pass a new or empty folder")
    model, ckpt = load_model(checkpoint, torch.device("cpu"))
    tokenizer = hf_tokenizer(run_tokenizer(ckpt, checkpoint, corpus))
    wrap(model.eval(), ckpt["config"]["model"]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
