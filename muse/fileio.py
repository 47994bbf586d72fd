"""Atomic file writes: a reader, or a crash, never sees half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write_bytes(path: Path | str, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temporary file beside `path` (same filesystem, so os.replace is a
    rename), fsync it, then move it into place; on any failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write_bytes(path, lambda f: f.write(data))
