"""A user's mistake found while a test runs (MuseError) stops the session as a usage error."""

import json

import pytest

import muse.harness.results

muse.harness.results.environment_facts()  # once, before any inner session (see test_plugin.py)

MISTAKE = """
from muse.errors import MuseError

def test_loads(case, record):
    record(case, "m", 1.0, "1")
    open("ran-before", "w").close()

def test_bad_checkpoint(model_case):
    raise MuseError("checkpoint 'x.pt' is not a complete checkpoint")

def test_after():
    open("ran-after", "w").close()
"""


def test_a_muse_error_in_a_test_is_a_usage_error(pytester):
    pytester.makepyfile(test_mistake=MISTAKE)
    results = pytester.path / "results"
    result = pytester.runpytest("-p", "no:cacheprovider", "--results", str(results),
                                "--model", "transformer:tiny", "--seq", "8")
    assert (pytester.path / "ran-before").exists()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stdout.fnmatch_lines(["*test_bad_checkpoint*: checkpoint 'x.pt' is not a complete "
                                 "checkpoint*"])
    assert not (pytester.path / "ran-after").exists()  # stopped there
    # what was measured before is kept, in a run file marked incomplete (not as latest.json)
    [kept] = [json.loads(p.read_text()) for p in results.glob("2*.json")]
    assert kept["complete"] is False and kept["missing"].startswith("stopped early")
    assert [r["metric"] for r in kept["records"]] == ["m"]
    assert not (results / "latest.json").exists()
