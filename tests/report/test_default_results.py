"""`muse report` with no results file renders every latest.json under reports/results/ (the
bench's and the perplexity gate's), with the training history the results name."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from muse.cli import main
from muse.errors import MuseError
from muse.report.render import latest_results, load, named_history, read_history

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "results_h200.json"


def perplexity_doc(history: str) -> dict:
    doc = json.loads(FIXTURE.read_text())
    rec = dict(doc["records"][0], criterion="perplexity", metric="ppl", value=123.0, unit="1",
               status="RECORDED", threshold=None, comparison=None, passed=None,
               extra={"history": history})
    doc["run"], doc["records"] = "20261201T000000Z-abc1234", [rec]
    return doc


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "reports" / "results"
    (root / "perplexity" / "run-perplexity").mkdir(parents=True)
    (root / "archive").mkdir()
    shutil.copy(FIXTURE, root / "latest.json")
    shutil.copy(FIXTURE, root / "archive" / "20261120T000000Z-old.json")  # not a latest.json
    # the folder as the gate recorded it, relative to wherever it ran
    doc = perplexity_doc("elsewhere/results/perplexity/run-perplexity")
    (root / "perplexity" / "latest.json").write_text(json.dumps(doc))
    rows = [{"step": s, "loss": 5.0 - s} for s in range(4)]
    (root / "perplexity" / "run-perplexity" / "history.json").write_text(
        json.dumps({"phase2:small seed0 model": rows}))
    monkeypatch.chdir(tmp_path)
    return root


def test_every_latest_json_is_found(results):
    """Runs that started together come in path order."""
    assert latest_results() == [Path("reports/results/latest.json"),
                                Path("reports/results/perplexity/latest.json")]


@pytest.mark.parametrize("later, earlier", [
    ("eleventh", "tenth"),  # folder names that do not sort by date
    ("seventeenth", "eleventh/step-profiles/results"),  # the earlier run deeper
    ("tenth/issue13/results", "eleventh"),  # the later run deeper
])
def test_a_later_run_comes_after_an_earlier_one_at_any_depth(results, later, earlier):
    """The later run's records replace the earlier's, wherever either sits."""
    doc = json.loads(FIXTURE.read_text())
    for folder, started in ((later, "2026-12-03T17:00:00Z"), (earlier, "2026-12-02T17:00:00Z")):
        (results / folder).mkdir(parents=True)
        (results / folder / "latest.json").write_text(json.dumps({**doc, "started_at": started}))
    found = latest_results()
    assert found.index(Path(f"reports/results/{earlier}/latest.json")) < found.index(
        Path(f"reports/results/{later}/latest.json"))


def test_the_default_renders_both_files_and_the_named_history(results, capsys):
    assert main(["report", "--out", "out"]) == 0
    report = Path("out/REPORT.md").read_text(encoding="utf-8")
    assert "- `reports/results/latest.json`" in report
    assert "- `reports/results/perplexity/latest.json`" in report
    assert "archive" not in report
    assert "| transformer:small | 16384 | 123 |" in Path("out/tables/perplexity.md").read_text()
    assert Path("out/plots/training.png").is_file()


def test_a_gzipped_history_is_found_and_read(results):
    plain = results / "perplexity" / "run-perplexity" / "history.json"
    with gzip.open(plain.with_suffix(".json.gz"), "wt", encoding="utf-8") as f:
        f.write(plain.read_text(encoding="utf-8"))
    plain.unlink()
    _, docs = load(latest_results())
    history = named_history(docs)
    assert [r["loss"] for r in history["phase2:small seed0 model"]] == [5.0, 4.0, 3.0, 2.0]


def test_a_truncated_gzip_is_one_clear_error(tmp_path):
    whole = gzip.compress(b'{"a": [{"step": 1, "loss": 2.0}]}')
    path = tmp_path / "history.json.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MuseError, match="is not a whole gzip file"):
        read_history(path)


@pytest.mark.parametrize("make", ["no folder", "empty folder"])
def test_nothing_to_render_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, make):
    if make == "empty folder":
        (tmp_path / "reports" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'reports/results'" in err, err
    assert not (tmp_path / "out").exists()


def test_runs_of_one_model_on_two_corpora_are_two_rows_and_no_filler():
    from muse.harness.results import Record
    from muse.report.render import TABLES, build_table, record_frame

    def ppl(corpus, value):
        return Record("perplexity", "phase2", "small", "ppl_degradation", value, "1", "PASS",
                      seq=1024, threshold=0.05, comparison="<", extra={"corpus": corpus})

    memory = Record("memory", "phase2", "small", "peak_vram_forward_bytes", 1e9, "bytes",
                    "RECORDED", seq=4096)
    df = record_frame([memory, ppl("wiki-mini", 0.6), ppl("en-prose", -0.05)])
    spec = {s.name: s for s in TABLES}
    rows = build_table(spec["perplexity"], df).rows
    assert [r[0] for r in rows] == ["phase2:small (en-prose)", "phase2:small (wiki-mini)"]
    # the memory table has its own row and no "not measured" row per corpus
    assert [r[0] for r in build_table(spec["memory"], df).rows] == ["phase2:small"]
