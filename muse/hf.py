"""Hugging Face interop: a `PretrainedConfig` and a `PreTrainedModel` wrapper per model family,
registered with `AutoConfig` and `AutoModelForCausalLM`, so that after `import muse.hf` a folder
written by `muse export` loads with `AutoModelForCausalLM.from_pretrained(folder)` and reaches
the field's tools (generate(), lm-evaluation-harness).

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
from muse.errors import MuseError
from muse.extras import needs

with needs("Hugging Face interop (muse.hf, muse export)"):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
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


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A `muse train` checkpoint → a save_pretrained folder (config.json and safetensors)."""
    from muse.training.evaluate import load_model

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MuseError(f"OUT_DIR {str(out)!r} exists and is not an empty folder; "
                        "pass a new or empty folder")
    model, ckpt = load_model(checkpoint, torch.device("cpu"))
    wrap(model.eval(), ckpt["config"]["model"]).save_pretrained(out)
    return out
