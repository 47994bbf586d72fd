"""The one error type for a user's mistake (a bad file, value, name, path or device)."""

from __future__ import annotations


class MuseError(ValueError):
    """A user's mistake, raised where it is detected, with a message that names the bad value
    and says what is valid. `muse` prints it as one line and exits 2; the pytest plugin turns
    it into a usage error. A ValueError, so callers that catch those keep working."""


def one_line(message: object) -> str:
    """The message on one line: a multi-line cause (a TOML or JSON parser's) is folded in."""
    return " ".join(str(message).split())
