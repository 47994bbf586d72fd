"""The results file (schema v1): one JSON document per run, written atomically, plus latest.json."""

from __future__ import annotations

import gzip
import json
import math
import numbers
import os
import platform
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from muse.errors import MuseError
from muse.fileio import atomic_write_text

SCHEMA_VERSION = 1
STATUSES = ("PASS", "FAIL", "INCONCLUSIVE", "RECORDED", "OOM", "ERROR")
COMPARISONS = ("<", "<=", ">", ">=")

# JSON has no NaN or infinity, and dropping them to null would hide a broken measurement behind
# "not measured". They are stored as these strings and turned back into floats when read.
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _encode_float(x: Any) -> Any:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    x = float(x)  # also turns numpy scalars into something json can write
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _decode_float(x: Any) -> Any:
    return _NONFINITE.get(x, x) if isinstance(x, str) else x


def _encode_extra(x: Any) -> Any:
    # extra is free-form, so non-finite floats in it are encoded but not decoded: a string
    # "nan" there may have been a string all along.
    if isinstance(x, dict):
        return {str(k): _encode_extra(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode_extra(v) for v in x]
    return _encode_float(x)


def _check_comparison(comparison: str) -> None:
    if comparison not in COMPARISONS:
        raise ValueError(f"unknown comparison {comparison!r}, expected one of {COMPARISONS}")


_REQUIRED = ("criterion", "model", "preset", "metric", "value", "unit", "status")
_TYPES = {  # a record read back: each field's JSON type (None: null allowed)
    **dict.fromkeys(("criterion", "model", "preset", "metric", "unit", "status"), (str,)),
    **dict.fromkeys(("value", "threshold"), (numbers.Real, None)),
    **dict.fromkeys(("params", "seq", "batch"), (int, None)),
    **dict.fromkeys(("dtype", "device", "comparison", "case_id"), (str, None)),
    "extra": (dict,),
}
_TYPE_WORDS = {str: "a string", numbers.Real: "a number", int: "an integer", dict: "an object"}


def _check_types(kwargs: dict) -> None:
    for key, value in kwargs.items():
        kinds = _TYPES[key]
        if value is None and None in kinds:
            continue
        if isinstance(value, bool) or not isinstance(value, tuple(k for k in kinds if k)):
            words = " or ".join(_TYPE_WORDS[k] if k else "null" for k in kinds)
            raise MuseError(f"record {kwargs.get('metric')!r}: {key} must be {words}, "
                            f"got {value!r}")


@dataclass
class Record:
    criterion: str  # "memory", "gradient_flow", "scaling", "throughput", "stability", ...
    model: str  # registry name, e.g. "transformer"
    preset: str
    metric: str  # e.g. "peak_vram_forward_bytes", "loglog_slope_top"
    value: float | None  # None only when nothing was measured; status says why
    unit: str  # "bytes", "s", "tokens/s", "1", ...
    status: str  # one of STATUSES
    params: int | None = None
    seq: int | None = None
    batch: int | None = None
    dtype: str | None = None
    device: str | None = None
    threshold: float | None = None
    comparison: str | None = None  # how value is compared with threshold: one of COMPARISONS
    case_id: str | None = None  # the pytest id, e.g. "transformer:small-seq4096-fp16"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}, expected one of {STATUSES}")
        if self.comparison is not None:
            _check_comparison(self.comparison)

    @property
    def passed(self) -> bool | None:
        if self.status == "PASS":
            return True
        if self.status in ("FAIL", "OOM", "ERROR"):
            return False
        return None  # INCONCLUSIVE and RECORDED make no claim

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["value"] = _encode_float(self.value)
        d["threshold"] = _encode_float(self.threshold)
        d["extra"] = _encode_extra(self.extra)
        d["passed"] = self.passed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names - {"passed"})  # passed is derived from status
        if unknown:
            raise MuseError(f"unknown record key(s): {', '.join(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.name in _REQUIRED)
        if missing:
            raise MuseError(f"record is missing key(s): {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in names}
        for k in ("value", "threshold"):
            if k in kwargs:
                kwargs[k] = _decode_float(kwargs[k])
        _check_types(kwargs)
        try:
            return cls(**kwargs)
        except ValueError as e:  # an unknown status or comparison
            raise MuseError(f"record {kwargs.get('metric')!r}: {e}") from None


def verdict(value: float | None, threshold: float, comparison: str) -> str:
    _check_comparison(comparison)
    # A NaN compares False with everything, which would make ">" and "<" disagree on it;
    # a missing or non-finite measurement never meets a threshold.
    if value is None or not math.isfinite(value):
        return "FAIL"
    ok = {
        "<": value < threshold,
        "<=": value <= threshold,
        ">": value > threshold,
        ">=": value >= threshold,
    }[comparison]
    return "PASS" if ok else "FAIL"


def _run(cmd: list[str], cwd=None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_facts(cwd=None) -> dict:
    # A copy of the tree on a remote GPU runner is told its commit by whoever copied it
    # (MUSE_GIT_SHA, MUSE_GIT_DIRTY). That word wins: such a copy may carry a stale .git.
    if os.environ.get("MUSE_GIT_SHA"):
        env_dirty = os.environ.get("MUSE_GIT_DIRTY")
        return {
            "sha": os.environ["MUSE_GIT_SHA"],
            "dirty": None if env_dirty is None else env_dirty.lower() in ("1", "true", "yes"),
        }
    sha = _run(["git", "rev-parse", "HEAD"], cwd)
    # Untracked files do not count: the results being written would make every run dirty.
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd)
    sha = (sha.strip() or None) if sha is not None else None
    if sha is None:  # no history and no word from the copier: unknown rather than guessed
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": bool(status.strip()) if status is not None else None}


def _fact(get):
    # Facts are decoration on a run that already happened; none of them may cost the results.
    try:
        return get()
    except Exception:
        return None


def _driver_version() -> str | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                v = pynvml.nvmlSystemGetDriverVersion()
            finally:
                pynvml.nvmlShutdown()
            return v.decode() if isinstance(v, bytes) else str(v)
        except Exception:
            pass
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        lines = out.split() if out else []
        return lines[0] if lines else None
    return None


def environment_facts() -> dict:
    try:
        import torch
    except Exception:
        torch = None

    def triton_version():
        import triton

        return triton.__version__

    cuda = _fact(lambda: torch.cuda.is_available()) if torch else None
    count = _fact(lambda: torch.cuda.device_count() if cuda else 0) if torch else None
    return {
        "python": platform.python_version(),
        "platform": _fact(platform.platform),
        "torch": torch.__version__ if torch else None,
        "torch_cuda": _fact(lambda: torch.version.cuda) if torch else None,
        "triton": _fact(triton_version),
        "cuda_available": cuda,
        "gpu_count": count,
        "gpu_names": _fact(lambda: [torch.cuda.get_device_name(i) for i in range(count)])
        if count is not None
        else None,
        "driver": _fact(_driver_version),
        "hostname": _fact(socket.gethostname),
    }


def _utc(t: datetime) -> datetime:
    # A naive datetime is taken to be UTC already, not local time.
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def run_name(now: datetime | None = None, sha: str | None = None) -> str:
    stamp = _utc(now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{sha[:7]}" if sha else stamp


def _iso(t: datetime) -> str:
    return _utc(t).isoformat().replace("+00:00", "Z")


def build_document(
    records: list[Record],
    command: list[str] | str,
    facts: dict | None = None,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
) -> dict:
    """facts may carry precomputed "git" and/or "environment"; the missing ones are gathered."""
    facts = facts or {}
    git = facts["git"] if "git" in facts else git_facts()
    env = facts["environment"] if "environment" in facts else environment_facts()
    finished_at = finished_at or datetime.now(timezone.utc)
    started_at = started_at or finished_at
    verdicts = [r.passed for r in records]
    return {
        "schema_version": SCHEMA_VERSION,
        "run": run_name(started_at, (git or {}).get("sha")),
        "command": command if isinstance(command, str) else shlex.join(command),
        "started_at": _iso(started_at),
        "finished_at": _iso(finished_at),
        "git": git,
        "environment": env,
        "records": [r.to_dict() for r in records],
        "summary": {
            "passed": verdicts.count(True),
            "failed": verdicts.count(False),  # FAIL, OOM and ERROR
            "inconclusive": sum(r.status == "INCONCLUSIVE" for r in records),
            "recorded": sum(r.status == "RECORDED" for r in records),
        },
    }


def write_document(doc: dict, directory, latest: bool = True) -> Path:
    """<run>.json, never over another run's file; latest.json too unless `latest` is False
    (an incomplete run does not displace the last complete one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def default(o):
        if isinstance(o, Record):
            return o.to_dict()
        raise TypeError(f"cannot write {type(o).__name__} to the results file")

    # Serialise before touching the disk, so a bad value leaves no file behind.
    text = json.dumps(doc, indent=2, allow_nan=False, default=default) + "\n"
    # Two runs started in the same second of one commit share a run name: the second one's
    # file gets its pid (and then random letters) added, and is never written over the first.
    pid = os.getpid()
    for suffix in ("", f"-p{pid}", *(f"-p{pid}-{secrets.token_hex(4)}" for _ in range(16))):
        run = doc["run"] + suffix
        if suffix:
            text = json.dumps({**doc, "run": run}, indent=2, allow_nan=False,
                              default=default) + "\n"
        path = directory / f"{run}.json"
        try:
            atomic_write_text(path, text, exclusive=True)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free results file name for run {doc['run']} in {directory}")
    if latest:
        atomic_write_text(directory / "latest.json", text)
    return path


def check_writable(directory) -> None:
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".write-check.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"results directory {directory} is not writable: {e}") from e


def read_json(path, where: str):
    """A JSON file a user named (gzipped when its name ends in .gz); MuseError saying `where` it
    was and what is wrong with it."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MuseError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise MuseError(f"{where} is a directory; pass a .json file") from None
    except (gzip.BadGzipFile, EOFError) as e:  # BadGzipFile is an OSError: first
        raise MuseError(f"{where} is not a whole gzip file ({e})") from None
    except OSError as e:
        raise MuseError(f"{where} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise MuseError(f"{where} is not JSON text (byte offset {e.start} is not UTF-8)") from None
    except json.JSONDecodeError as e:
        raise MuseError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column "
                        f"{e.colno}; truncated?)") from None


def read_document(path) -> dict:
    """A results file, its records as Records; MuseError naming the file and what is wrong."""
    where = f"results file {str(path)!r}"
    if Path(path).is_dir():
        raise MuseError(f"{where} is a directory; pass a .json results file such as "
                        "reports/results/latest.json")
    doc = read_json(path, where)
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if version != SCHEMA_VERSION:
        raise MuseError(f"{where}: schema_version {version!r} is not supported (expected "
                        f"{SCHEMA_VERSION}): not a muse results file?")
    records = doc.get("records", [])
    if not isinstance(records, list):
        raise MuseError(f"{where}: records must be a list, got {type(records).__name__}")
    doc["records"] = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise MuseError(f"{where}: record {i} is not an object, got {r!r:.60}")
        try:
            doc["records"].append(Record.from_dict(r))
        except MuseError as e:
            raise MuseError(f"{where}: record {i}: {e}") from None
    return doc
