"""Reading a training checkpoint back. A file that is not a complete muse checkpoint (truncated,
corrupted, a directory, another program's file, a bare state_dict) is the user's mistake."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from muse.errors import MuseError, one_line

KEYS = ("model", "optimizer", "scaler", "step", "data_generator", "rng", "config",
        "model_overrides", "tokenizer", "corpus", "best_val_loss", "history")
WRITTEN_BY = "a .pt file written by muse train (step-NNNNNN.pt, best.pt, final.pt, emergency.pt)"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint dict; MuseError naming the file and what is wrong with it otherwise.
    Checkpoints hold Python objects (RNG states): load only checkpoints you trust."""
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if path.is_dir():
        raise MuseError(f"{where} is a directory; pass {WRITTEN_BY}")
    if not path.is_file():
        raise MuseError(f"{where} does not exist; pass {WRITTEN_BY}")
    # torch's zip reader checks no CRC, so a flipped byte in a tensor would load as a wrong
    # weight: zipfile checks every member's CRC first
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise MuseError(f"{where} is not a complete checkpoint (truncated, or not a .pt file: "
                        f"{one_line(e)}); pass {WRITTEN_BY}") from None
    if bad is not None:
        raise MuseError(f"{where} is corrupted: the checksum of its record {bad!r} does not "
                        f"match; pass {WRITTEN_BY}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # the unpickler raises many kinds for a file that is not one
        raise MuseError(f"{where} cannot be read ({type(e).__name__}: "
                        f"{one_line(e)[:200]}); pass {WRITTEN_BY}") from None
    missing = [k for k in KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        what = "a bare state_dict" if _is_state_dict(ckpt) else "another program's file"
        raise MuseError(f"{where} is not a muse training checkpoint ({what}: it lacks "
                        f"{', '.join(missing)}); pass {WRITTEN_BY}")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["config"].get("model"), str):
        raise MuseError(f"{where} holds no model name in its config; pass {WRITTEN_BY}")
    return ckpt


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def load_weights(model: torch.nn.Module, ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """The checkpoint's weights into `model`; MuseError when they do not fit it."""
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise MuseError(f"checkpoint {os.fspath(path)!r}: its weights do not fit "
                        f"{ckpt['config']['model']!r} ({one_line(e)[:200]})") from None
