"""A training run's folder: one training at a time (a lock file naming its owner, released by
the kernel when the owner dies, so a lock left by a killed run is stale and taken over), and a
folder that holds a run is continued (resume) or replaced (overwrite), never mixed."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from muse.errors import MuseError

LOCK = "train.lock"
RUN_FILES = ("run.json", "history.json", "best.pt", "final.pt", "emergency.pt", "step-*.pt")


def run_files(out: Path) -> list[Path]:
    """The files of a run already in `out` (with temporary files a killed write left)."""
    if not out.is_dir():
        return []
    found = {p for pattern in RUN_FILES for p in out.glob(pattern)}
    found |= {p for pattern in RUN_FILES for p in out.glob(f".{pattern}.*.tmp")}
    return sorted(found)


def check_reuse(out: Path, resume: bool, overwrite: bool, held: bool = False) -> None:
    """MuseError when another training holds `out` (unless `held`: this one does), or when
    `out` holds a run and neither resume nor overwrite says what to do with it."""
    if not held:
        _check_free(out)
    if out.exists() and not out.is_dir():
        raise MuseError(f"out_dir {str(out)!r} is a file, not a folder; choose another out_dir")
    held = [p.name for p in run_files(out) if not p.name.startswith(".")]
    if held and not (resume or overwrite):
        shown = ", ".join(held[:4]) + (", …" if len(held) > 4 else "")
        raise MuseError(f"out_dir {str(out)!r} already holds a run ({shown}); continue it with "
                        "--resume CKPT.pt, replace it with --overwrite, or choose another out_dir")


class RunDir:
    """`with RunDir(out, resume, overwrite):` creates `out` and holds its lock; a folder this
    created is removed again if nothing was written into it."""

    def __init__(self, out: Path, resume: bool = False, overwrite: bool = False):
        self.out, self.resume, self.overwrite = Path(out), resume, overwrite
        self.created: list[Path] = []
        self.fd: int | None = None

    def __enter__(self) -> RunDir:
        check_reuse(self.out, self.resume, self.overwrite)
        try:
            self._make_dirs()
            self._lock()
            check_reuse(self.out, self.resume, self.overwrite, held=True)  # now that it is ours
        except BaseException:
            self.release()
            raise
        if self.overwrite:
            for path in run_files(self.out):
                path.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _make_dirs(self) -> None:
        self.created = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MuseError(f"out_dir {str(self.out)!r} cannot be created: "
                            f"{e.strerror or e}") from None

    def _lock(self) -> None:
        path = self.out / LOCK
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise MuseError(f"out_dir {str(self.out)!r} is not writable: "
                                f"{e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = _in_use(self.out, fd)
                os.close(fd)
                raise error from None
            except OSError as e:
                os.close(fd)
                raise MuseError(f"out_dir {str(self.out)!r} cannot be locked: "
                                f"{e.strerror or e}") from None
            # the owner before us may have removed the file between our open and our lock
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(owner) + "\n").encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            (self.out / LOCK).unlink(missing_ok=True)  # before the unlock: see _lock
            os.close(self.fd)
            self.fd = None
        for folder in self.created:  # deepest first
            try:
                folder.rmdir()  # only if empty: nothing was written
            except FileNotFoundError:
                continue
            except OSError:
                break
        self.created = []


def _in_use(out: Path, fd: int) -> MuseError:
    return MuseError(f"out_dir {str(out)!r} is in use by another training ({_read_owner(fd)}; "
                     f"lock file {str(out / LOCK)!r}); wait for it to end or choose another "
                     "out_dir")


def _check_free(out: Path) -> None:
    """Whether another training holds the lock, without taking it."""
    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:
        return  # no lock file (or none readable): taking the lock will tell
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(out, fd) from None
    except OSError:
        pass
    finally:
        os.close(fd)  # also lets go of the shared lock


def _read_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {owner['pid']} on {owner['host']}, since {owner['started_at']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"
