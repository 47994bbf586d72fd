"""Atomic file writes: a reader, or a crash, never sees half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def current_umask() -> int:
    # /proc says it without changing it; os.umask can only read it by setting it for a moment
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(
    path: Path | str, write: Callable[[BinaryIO], object], *, exclusive: bool = False
) -> None:
    """`write(file)` into a temporary file beside `path` (same filesystem, so os.replace is a
    rename), fsync it, then move it into place; on any failure the temporary file is removed.
    The file gets the mode an ordinary `open` would give (0666 less the umask). `exclusive`:
    never replace an existing `path` (FileExistsError), so two writers cannot share a name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails if the name is taken
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str, *, exclusive: bool = False) -> None:
    data = text.encode("utf-8")
    atomic_write_bytes(path, lambda f: f.write(data), exclusive=exclusive)
