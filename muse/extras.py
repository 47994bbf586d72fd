"""Optional dependencies: which extra of pyproject.toml brings each one, and the error that
names it when a feature needs one that is not installed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from muse.errors import MuseError

# top-level module → the extra that installs it
EXTRA_OF = {
    "pytest": "bench",
    "pytest_benchmark": "bench",
    "xdist": "bench",
    "pytest_jsonreport": "bench",
    "jinja2": "report",
    "pandas": "report",
    "matplotlib": "report",
    "tokenizers": "data",
    "datasets": "data",
    "transformers": "data",
    "tqdm": "data",
    "fla": "fla",
}


class MissingExtra(MuseError):
    """A feature needs an optional package that is not installed."""


@contextlib.contextmanager
def needs(feature: str) -> Iterator[None]:
    """Imports inside the block that fail for want of an optional package raise MissingExtra
    naming the package and the extra to install; any other import error passes through."""
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in EXTRA_OF:
            raise
        extra = EXTRA_OF[top]
        raise MissingExtra(
            f"{feature} needs {top}, which is not installed: pip install 'muse[{extra}]'"
        ) from None
