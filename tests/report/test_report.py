"""`muse report` rendered from a real H200 results file: golden Markdown, CSV that reads back to
the recorded numbers, and results with holes and failures that say so.

Regenerate the golden files deliberately, after reading the diff:
    pytest tests/report/test_report.py --regen-golden"""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from muse.cli import main
from muse.harness.results import read_document
from muse.report.plots import crossover
from muse.report.render import TABLES, render

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "results_h200.json"
GOLDEN = HERE / "golden"
MEASURED = ("memory", "throughput", "scaling", "gradient_flow", "stability")


def render_here(tmp: Path, results: Path, **kw) -> Path:
    """Renders with the results path relative to tests/report, as REPORT.md shows it."""
    cwd = os.getcwd()
    os.chdir(results.parent.parent)
    try:
        render([Path(results.parent.name) / results.name], tmp, **kw)
    finally:
        os.chdir(cwd)
    return tmp


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return render_here(tmp_path_factory.mktemp("report"), FIXTURE)


def write_variant(tmp: Path, edit) -> Path:
    doc = json.loads(FIXTURE.read_text())
    doc["records"] = edit(doc["records"])
    (tmp / "fixtures").mkdir(exist_ok=True)
    path = tmp / "fixtures" / "variant.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    "name", ["REPORT.md", *(f"tables/{t.name}.md" for t in TABLES)]
)
def test_markdown_matches_golden(out, name, request):
    got = (out / name).read_text(encoding="utf-8")
    golden = GOLDEN / name.replace("tables/", "")
    if request.config.getoption("regen_golden"):
        golden.write_text(got, encoding="utf-8")
    assert got == golden.read_text(encoding="utf-8"), f"{name} differs from {golden}"


@pytest.mark.parametrize("criterion", MEASURED)
def test_csv_reads_back_to_the_recorded_numbers(out, criterion):
    records = [r for r in read_document(FIXTURE)["records"] if r.criterion == criterion]
    df = pd.read_csv(out / "tables" / f"{criterion}.csv", dtype={"seq": str})
    cells = 0
    for r in records:
        if f"{r.metric}:status" not in df:
            continue  # a profile metric that only the plots show
        seq = "all" if r.seq is None else str(r.seq)
        row = df[(df.model == f"{r.model}:{r.preset}") & (df.seq == seq)]
        assert len(row) == 1, (r.model, seq)
        assert row[r.metric].iloc[0] == r.value
        assert row[f"{r.metric}:status"].iloc[0] == r.status
        cells += 1
    assert cells >= 8  # at least 2 models × 4 metrics


def test_report_states_facts_failures_and_thresholds(out):
    text = (out / "REPORT.md").read_text(encoding="utf-8")
    assert "NVIDIA H200" in text and "torch 2.11.0+cu130" in text
    assert "pytest bench -m gpu --model transformer transformer-eager" in text
    assert "git: unknown (not recorded)" in text  # the fixture run had no git history
    assert "**3 verdict(s) failed**" in text
    assert "11.167 GB FAIL (< 8.000 GB)" in text
    assert ("Not measured in these results: Decoding after a long prompt, Perplexity, "
            "Configuration sweep.") in text


def test_tex_is_escaped(out):
    tex = (out / "tables" / "scaling.tex").read_text(encoding="utf-8")
    assert r"\begin{tabular}{llrrrrrr}" in tex
    assert "1.661 FAIL ($\\le$ 1.15)" in tex
    assert "R$^2$" in tex
    body = tex.split(r"\midrule")[1]
    assert "_" not in body.replace(r"\_", "")


def test_html_is_self_contained(out):
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 4
    assert 'src="plots/' not in html and "http" not in html
    assert '<td class="FAIL">11.167 GB<br><span class="verdict">FAIL (&lt; 8.000 GB)</span>' in html
    assert "O(N²) control: when it passes too" in html  # each table says what it measures
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "gradient.png", "memory.png", "scaling.png", "throughput.png"]


def test_missing_and_failing_records_are_said_so(tmp_path):
    def edit(records):
        kept = [r for r in records if not (
            r["model"] == "transformer" and r["metric"] == "peak_vram_train_step_bytes")]
        for r in kept:
            if r["model"] == "transformer" and r["metric"] == "forward_linear_r2":
                r.update(value="nan", status="FAIL")
        kept.append({
            "criterion": "memory", "model": "phase2", "preset": "small", "metric": "run",
            "value": None, "unit": "", "status": "OOM", "seq": 16384,
            "case_id": "phase2:small-seq16384-fp16", "extra": {"error": "CUDA out of memory"},
        })
        return kept

    out = render_here(tmp_path / "out", write_variant(tmp_path, edit))
    memory = (out / "tables" / "memory.md").read_text(encoding="utf-8")
    assert "| transformer:small | 4096 | 0.516 GB PASS (< 8.000 GB) | not measured |" in memory
    assert "| phase2:small | 16384 | not measured (OOM) | not measured (OOM) |" in memory
    scaling = (out / "tables" / "scaling.md").read_text(encoding="utf-8")
    assert "nan FAIL (> 0.95)" in scaling
    stability = (out / "tables" / "stability.md").read_text(encoding="utf-8")
    assert "| phase2:small |  | not measured | not measured | not measured | not measured |" \
        in stability
    report = (out / "REPORT.md").read_text(encoding="utf-8")
    assert "**5 verdict(s) failed**" in report  # 3 + the nan fit + the OOM
    csv = pd.read_csv(out / "tables" / "memory.csv", dtype={"seq": str})
    row = csv[(csv.model == "transformer:small") & (csv.seq == "4096")].iloc[0]
    assert pd.isna(row["peak_vram_train_step_bytes"])
    assert row["peak_vram_train_step_bytes:status"] == "not measured"


def test_a_later_run_replaces_an_earlier_ones_verdicts_too(tmp_path):
    """The same key measured again: the verdicts, their counts and the failure count show the
    later run's record only, as the tables do."""
    def remeasured(records):
        later = [r for r in records if r["model"] == "transformer-eager"
                 and r["metric"] == "peak_vram_forward_bytes" and r["seq"] == 16384]
        for r in later:
            r.update(value=7.5e9, status="PASS")
        return later

    earlier = FIXTURE
    (tmp_path / "fixtures").mkdir()
    later = write_variant(tmp_path, remeasured)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        render([earlier, Path("fixtures") / later.name], tmp_path / "out")
    finally:
        os.chdir(cwd)
    report = (tmp_path / "out" / "REPORT.md").read_text(encoding="utf-8")
    assert "**2 verdict(s) failed**" in report  # the two slopes; the 11.167 GB is superseded
    rows = [line for line in report.splitlines()
            if line.startswith("| memory | transformer-eager:small | 16384 | peak_vram_forward")]
    assert len(rows) == 1 and "7.500 GB" in rows[0] and rows[0].endswith("| PASS |"), rows
    memory = (tmp_path / "out" / "tables" / "memory.md").read_text(encoding="utf-8")
    assert "11.167 GB" not in memory


def test_graphed_scaling_columns_appear_only_where_the_results_hold_them(tmp_path, out):
    def edit(records):
        graphed = [{**r, "metric": f"graphed_{r['metric']}", "value": r["value"] / 2}
                   for r in records if r["criterion"] == "scaling"
                   and r["metric"].startswith("forward_")]
        return records + graphed

    assert "CUDA graph" not in (out / "tables" / "scaling.md").read_text(encoding="utf-8")
    scaling = (render_here(tmp_path / "out", write_variant(tmp_path, edit)) / "tables" /
               "scaling.md").read_text(encoding="utf-8")
    header = scaling.splitlines()[4]
    assert header.endswith("| train-step slope (top) | forward time, CUDA graph | forward R², "
                           "CUDA graph | forward slope (top), CUDA graph |")  # none of train step
    assert "not measured" not in scaling


def test_a_results_file_without_records_renders(tmp_path):
    out = render_here(tmp_path / "out", write_variant(tmp_path, lambda records: []))
    report = (out / "REPORT.md").read_text(encoding="utf-8")
    assert "No verdict failed." in report and "_No verdicts" in report
    assert "Peak memory against sequence length: not plotted" in report
    assert not list((out / "plots").iterdir())


def test_history_adds_the_training_plot(tmp_path):
    history = tmp_path / "history.json"
    rows = [{"step": s, "loss": 5.0 / (1 + s), "val_ppl": 100.0 / (1 + s)} for s in range(5)]
    history.write_text(json.dumps({"phase2:small": rows, "transformer:small": rows}))
    out = render_here(tmp_path / "out", FIXTURE, history=history)
    assert (out / "plots" / "training.png").stat().st_size > 1000
    assert "![Loss and perplexity during training](plots/training.png)" in (
        out / "REPORT.md").read_text(encoding="utf-8")


def test_crossover_is_interpolated_where_the_ratio_crosses_one():
    assert crossover([(1024, 0.5), (2048, 0.8), (4096, 1.25)]) == pytest.approx(2896.3, rel=1e-3)
    assert crossover([(1024, 0.8), (2048, 0.5)]) is None


def test_cli_report_and_default_input(tmp_path, monkeypatch, capsys):
    (tmp_path / "reports" / "results").mkdir(parents=True)
    shutil.copy(FIXTURE, tmp_path / "reports" / "results" / "latest.json")
    monkeypatch.chdir(tmp_path)
    templates = HERE.parents[1] / "muse" / "report" / "templates"
    assert main(["report", "--out", "scratch", "--templates", str(templates)]) == 0
    assert (tmp_path / "scratch" / "report.html").is_file()
    assert main(["report", "missing.json"]) == 2
    assert capsys.readouterr().err == "muse report: results file 'missing.json' does not exist\n"
