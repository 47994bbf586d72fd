"""The one device resolver: the user's `auto | cuda | cpu` as a torch.device."""

from __future__ import annotations

import contextlib

import torch

from muse.errors import MuseError

DEVICES = ("auto", "cuda", "cpu")


def is_device_name(name: object) -> bool:
    """One of DEVICES, or one GPU as `cuda:<index>` (where parallel runs place their jobs)."""
    if name in DEVICES:
        return True
    index = name.removeprefix("cuda:") if isinstance(name, str) else ""
    return name != index and index.isdigit()


def resolve_device(name: str, option: str = "device") -> torch.device:
    """`auto`: CUDA when there is one, else the CPU; any other name as torch spells it.
    MuseError when CUDA is asked for and there is none; `option` is how the user set it
    (`--device` for a command-line flag), so the message names it as they wrote it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        if option.startswith("-"):
            raise MuseError(
                f"{option} cuda was given but CUDA is not available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda}); use {option} cpu for a CPU smoke run"
            )
        raise MuseError(f"{option} {name!r} asked for, but CUDA is not available here; "
                        "use 'cpu' or 'auto'")
    return torch.device(name)


@contextlib.contextmanager
def float32_matmuls(tf32: bool):
    """Within: whether CUDA float32 matmuls may round their inputs to TF32 (cuBLAS, and the
    delta rule's Triton walk and read-out under states="auto"); the setting before is restored
    after."""
    if not isinstance(tf32, bool):
        raise TypeError(f"tf32 must be true or false, got {tf32!r}")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
