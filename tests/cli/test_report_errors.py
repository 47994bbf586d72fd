"""`muse report` and `muse compare` on a user's mistake: exit status 2, one line on stderr
naming the file and the fault, and no report folder written."""

import json
import shutil
from pathlib import Path

import pytest

from muse.cli import main

from .cli_checks import usage_error

FIXTURE = Path(__file__).resolve().parents[1] / "report" / "fixtures" / "results_h200.json"
TEMPLATES = Path(__file__).resolve().parents[2] / "muse" / "report" / "templates"


def doc_with(change):
    doc = json.loads(FIXTURE.read_text())
    change(doc)
    return json.dumps(doc)


def set_value(doc):
    doc["records"][2]["value"] = "fast"


def not_objects(doc):
    doc["records"][1] = ["memory", 3]


BAD_RESULTS = {
    "truncated.json": (FIXTURE.read_text()[:500], ["is not valid JSON", "truncated?"]),
    "binary.json": (b"\x89PNG\r\n\x1a\n\xff\xfe", ["is not JSON text", "byte offset"]),
    "foreign.json": ('{"name": "some other tool"}', ["schema_version None is not supported"]),
    "value.json": (doc_with(set_value), ["record 2", "value must be a number or null, got "
                                         "'fast'"]),
    "lists.json": (doc_with(not_objects), ["record 1 is not an object, got ['memory', 3]"]),
}


@pytest.mark.parametrize("name", BAD_RESULTS)
@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_bad_results_file(tmp_path, capsys, name, command):
    content, words = BAD_RESULTS[name]
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    out = tmp_path / "out"
    argv = [path, "--out", out] if command == "report" else [FIXTURE, path]
    usage_error(capsys, [command, *argv], name, *words)
    assert not out.exists()


@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_directory_or_a_missing_file(tmp_path, capsys, command):
    first = [] if command == "report" else [FIXTURE]
    usage_error(capsys, [command, *first, tmp_path], "is a directory", "latest.json")
    usage_error(capsys, [command, *first, tmp_path / "none.json"], "none.json' does not exist")


@pytest.mark.parametrize("content, words", [
    (None, ["does not exist"]),
    ("{\"a\": [", ["is not valid JSON"]),
    ("[1, 2]", ["is not a training history.json"]),
    ('{"m": [{"loss": 1.0}]}', ["row 0 of 'm' has no integer step"]),
    ('{"m": [{"step": 1, "loss": "low"}]}', ["row 0 of 'm': loss must be a number or null, "
                                             "got 'low'"]),
])
def test_a_bad_history(tmp_path, capsys, content, words):
    path = tmp_path / "history.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    usage_error(capsys, ["report", FIXTURE, "--out", out, "--history", path], "--history",
                "history.json", *words)
    assert not out.exists()


def test_a_history_with_nulls_plots(tmp_path, capsys):
    # a diverged run's history.json: the non-finite loss is null, named in `nonfinite`
    path = tmp_path / "history.json"
    path.write_text(json.dumps({"m": [{"step": 1, "loss": 5.0},
                                      {"step": 2, "loss": None, "nonfinite": {"loss": "nan"}}]}))
    assert main(["report", str(FIXTURE), "--out", str(tmp_path / "out"), "--history",
                 str(path)]) == 0
    assert (tmp_path / "out" / "plots" / "training.png").is_file()


def test_bad_templates(tmp_path, capsys):
    out = tmp_path / "out"
    usage_error(capsys, ["report", FIXTURE, "--out", out, "--templates", tmp_path / "none"],
                "--templates", "none' is not a folder")
    partial = tmp_path / "partial"
    shutil.copytree(TEMPLATES, partial)
    (partial / "memory.tex.j2").unlink()
    usage_error(capsys, ["report", FIXTURE, "--out", out, "--templates", partial],
                "lacks 1 template(s): memory.tex.j2")
    shutil.copy(TEMPLATES / "memory.tex.j2", partial)
    (partial / "REPORT.md.j2").write_text("{{ no_such_thing.x }}")
    usage_error(capsys, ["report", FIXTURE, "--out", out, "--templates", partial],
                "template 'REPORT.md.j2'", "no_such_thing")
    (partial / "REPORT.md.j2").write_text("{% for %}")
    usage_error(capsys, ["report", FIXTURE, "--out", out, "--templates", partial],
                "template 'REPORT.md.j2'", "TemplateSyntaxError")
    assert not out.exists()


def test_a_bad_out(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    usage_error(capsys, ["report", FIXTURE, "--out", blocker], "--out", "a-file' is a file")
    usage_error(capsys, ["report", FIXTURE, "--out", blocker / "out"], "--out",
                "cannot be written", "Not a directory")
    assert blocker.read_text() == "x"
