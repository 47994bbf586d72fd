"""The report's figures from a small synthetic results document: a matched pair shares a colour,
the ratios to the matched transformer are the recorded ones (tokens/s) or computed from the
peaks (memory), per protocol, and every figure is a PNG."""

import json

import pytest

from muse.harness.results import SCHEMA_VERSION, Record
from muse.report import plots
from muse.report.render import render

SEQS = (1024, 2048, 4096)
MODEL, BASE, CONTROL = "phase2:small", "transformer:small", "transformer-eager:small"


def rec(spec, criterion, metric, seq, value, unit="1", **extra) -> Record:
    model, preset = spec.split(":")
    return Record(criterion, model, preset, metric, value, unit, "RECORDED", seq=seq, batch=1,
                  extra=extra)


def synthetic() -> list[Record]:
    out = []
    for i, seq in enumerate(SEQS):
        for spec, gb in ((MODEL, 1.0), (BASE, 2.0 * (i + 1)), (CONTROL, 4.0)):
            out.append(rec(spec, "memory", "peak_vram_forward_bytes", seq, gb * 1e9, "bytes"))
            out.append(rec(spec, "memory", "peak_vram_train_step_bytes", seq, 3 * gb * 1e9,
                           "bytes"))
            for phase in plots.PHASES:
                out.append(rec(spec, "throughput", f"{phase}_tokens_per_s", seq,
                               1e5 * (i + 1), "tokens/s"))
        # phase2 is slower at 1024 and faster from 2048: a crossover between them
        for spec in (MODEL, CONTROL):
            for phase in plots.PHASES:
                out.append(rec(spec, "throughput", f"{phase}_speedup_vs_transformer", seq,
                               0.5 * (i + 1), baseline=BASE))
        out.append(rec(MODEL, "throughput", "fixed_step_speedup_vs_transformer", seq, 0.8 + i,
                       baseline=BASE, peak_bytes=3e9, baseline_peak_bytes=6e9,
                       tokens_per_step=65536))
    # a kernel's speedup over another kernel names no matched model: no ratio line of its own
    out.append(rec("bk_core:triton", "bk_core", "forward_speedup_vs_scan", 1024, 3.0))
    return out


def test_matched_pairs_share_a_colour_model_solid_transformer_dashed():
    pairs = plots.matched(synthetic())
    assert pairs == {MODEL: BASE, CONTROL: BASE}
    styles = plots.pair_styles([MODEL, BASE, CONTROL], pairs)
    assert styles[MODEL]["color"] == styles[BASE]["color"]
    assert (styles[MODEL]["ls"], styles[BASE]["ls"], styles[CONTROL]["ls"]) == ("-", "--", "--")
    assert styles[CONTROL]["color"] != styles[MODEL]["color"]  # a control is no one's pair


def test_a_transformer_matched_to_two_models_gets_its_own_colour():
    pairs = {"phase1:10gb": "transformer:t", "phase1:dense": "transformer:t"}
    styles = plots.pair_styles([*pairs, "transformer:t"], pairs)
    colours = {styles[s]["color"] for s in (*pairs, "transformer:t")}
    assert len(colours) == 3


def test_speed_ratios_are_the_recorded_ones_per_protocol():
    speed = plots.speed_ratios(synthetic())
    assert set(speed) == {"forward", "train_step", "fixed_step"}
    assert speed["train_step"] == {MODEL: [(1024, 0.5), (2048, 1.0), (4096, 1.5)]}
    assert speed["fixed_step"][MODEL] == [(1024, 0.8), (2048, 1.8), (4096, 2.8)]


def test_memory_ratio_is_the_model_peak_over_its_transformer_at_each_seq():
    mem = plots.memory_ratios(synthetic())
    assert mem["forward"][MODEL] == [(1024, pytest.approx(0.5)), (2048, pytest.approx(0.25)),
                                     (4096, pytest.approx(1 / 6))]
    assert mem["train_step"][MODEL][0] == (1024, pytest.approx(0.5))
    assert mem["fixed_step"][MODEL] == [(s, pytest.approx(0.5)) for s in SEQS]
    assert CONTROL not in mem["forward"]  # a transformer is not a family to compare


def test_every_figure_is_a_png_and_the_ratio_plot_is_written(tmp_path):
    records = synthetic()
    for figure in (plots.throughput, plots.ratios, plots.memory):
        assert figure(records).startswith(b"\x89PNG")
    assert plots.ratios([r for r in records if r.criterion == "memory"]) is None
    written = render([], tmp_path, history={})
    assert "ratios.png" not in written  # no results, no figure drawn empty


def test_the_ratio_plot_renders_from_a_results_file(tmp_path):
    doc = {"schema_version": SCHEMA_VERSION, "records": [r.to_dict() for r in synthetic()]}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    written = render([tmp_path / "results.json"], tmp_path / "out")
    assert written["ratios.png"].read_bytes().startswith(b"\x89PNG")
    report = (tmp_path / "out" / "REPORT.md").read_text(encoding="utf-8")
    assert "](plots/ratios.png)" in report


def test_the_ratio_table_has_a_row_per_model_and_protocol_and_a_cell_per_seq():
    records = synthetic() + [rec(MODEL, "throughput", "compiled_batch_step_speedup_vs_transformer",
                                 4096, 0.25, baseline=BASE, peak_bytes=2e9,
                                 baseline_peak_bytes=1e9, tokens_per_step=4096)]
    seqs, rows = plots.ratio_rows(records)
    assert seqs == list(SEQS)
    got = {(model, protocol): cells for model, protocol, cells in rows}
    # the transformers (the baseline and the O(N²) control) have no rows of their own
    assert {m for m, _ in got} == {MODEL}
    assert got[MODEL, "train step, batch 1"] == ["0.50× / 0.50×", "1.00× / 0.25×",
                                                 "1.50× / 0.17×"]
    assert got[MODEL, "AdamW step, 65,536 tokens/step"] == ["0.80× / 0.50×", "1.80× / 0.50×",
                                                           "2.80× / 0.50×"]
    assert got[MODEL, "AdamW step, batch 1, compiled"] == ["", "", "0.25× / 2.00×"]


def test_the_report_carries_the_ratio_table(tmp_path):
    doc = {"schema_version": SCHEMA_VERSION, "records": [r.to_dict() for r in synthetic()]}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    written = render([tmp_path / "results.json"], tmp_path / "out")
    text = written["REPORT.md"].read_text()
    assert "| phase2:small | AdamW step, 65,536 tokens/step | 0.80× / 0.50× |" in text
    assert "<td>AdamW step, 65,536 tokens/step</td>" in written["report.html"].read_text()


def _fixed_step(spec, seq, ratio, base=BASE):
    return rec(spec, "throughput", "fixed_step_speedup_vs_transformer", seq, ratio, baseline=base,
               tokens_per_step=65536)


def test_the_peer_table_divides_by_the_best_peer_of_the_same_size():
    """Per seq the fastest fla peer matched to the same transformer, named; a peer of another
    size (another matched transformer) is not compared, and a seq with no peer has no cell."""
    records = [_fixed_step(MODEL, 4096, 0.5), _fixed_step(MODEL, 65536, 1.5),
               _fixed_step(MODEL, 16384, 0.8),
               _fixed_step("fla-gla:small", 4096, 1.0), _fixed_step("fla-gla:small", 65536, 2.0),
               _fixed_step("fla-retnet:small", 4096, 1.25),
               _fixed_step("fla-deltanet:base", 16384, 0.1, base="transformer:base")]
    seqs, rows = plots.peer_rows(records)
    assert seqs == [4096, 65536]
    assert rows == [(MODEL, "AdamW step, 65,536 tokens/step",
                     ["0.40× (fla-retnet:small)", "0.75× (fla-gla:small)"])]


def test_the_report_carries_the_peer_table_only_where_a_peer_was_measured(tmp_path):
    for peers, shown in (([], False), ([_fixed_step("fla-gla:small", 4096, 1.0)], True)):
        records = synthetic() + [_fixed_step(MODEL, 4096, 0.5)] + peers
        doc = {"schema_version": SCHEMA_VERSION, "records": [r.to_dict() for r in records]}
        (tmp_path / "results.json").write_text(json.dumps(doc))
        written = render([tmp_path / "results.json"], tmp_path / "out")
        text = written["REPORT.md"].read_text()
        assert ("| phase2:small | AdamW step, 65,536 tokens/step | 0.50× (fla-gla:small) |"
                in text) is shown
        assert ("<h3>Against the best fla peer</h3>" in written["report.html"].read_text()) \
            is shown
