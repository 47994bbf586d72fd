"""`muse compare`: the regression gate between two results files."""

import json
from pathlib import Path

import pytest

from muse.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "report" / "fixtures" / "results_h200.json"
GATES = ["--fail", "vram:5%", "--fail", "tokens_per_s:-5%", "--fail", "ppl:2%"]


def variant(tmp_path: Path, edit) -> str:
    doc = json.loads(FIXTURE.read_text())
    for r in doc["records"]:
        edit(r)
    path = tmp_path / "new.json"
    path.write_text(json.dumps(doc))
    return str(path)


def scale(unit: str, factor: float):
    def edit(r):
        if r["unit"] == unit and isinstance(r["value"], float):
            r["value"] *= factor
    return edit


def test_identical_rerun_passes(capsys):
    assert main(["compare", str(FIXTURE), str(FIXTURE), *GATES]) == 0
    out = capsys.readouterr().out
    assert "REGRESSION" not in out
    assert "no regression beyond vram +5%, tokens_per_s -5%, ppl +2%" in out


def test_planted_vram_regression_fails(tmp_path, capsys):
    new = variant(tmp_path, scale("bytes", 1.10))
    assert main(["compare", str(FIXTURE), new, *GATES]) == 1
    out = capsys.readouterr().out
    assert out.count("REGRESSION") == 20  # 10 forward + 10 train-step peaks
    assert "+10.0%" in out and "20 regression(s) beyond tolerance" in out


def test_changes_within_tolerance_or_in_the_good_direction_pass(tmp_path):
    assert main(["compare", str(FIXTURE), variant(tmp_path, scale("bytes", 1.04)), *GATES]) == 0
    assert main(["compare", str(FIXTURE), variant(tmp_path, scale("bytes", 0.5)), *GATES]) == 0
    assert main(["compare", str(FIXTURE), variant(tmp_path, scale("tokens/s", 2.0)), *GATES]) == 0


def test_tokens_per_s_falling_fails(tmp_path, capsys):
    new = variant(tmp_path, scale("tokens/s", 0.9))
    assert main(["compare", str(FIXTURE), new, "--fail", "tokens_per_s:-5%"]) == 1
    assert main(["compare", str(FIXTURE), new, "--fail", "tokens_per_s:-15%"]) == 0
    assert main(["compare", str(FIXTURE), new, "--fail", "vram:5%"]) == 0


def test_a_vanished_measurement_is_a_regression(tmp_path, capsys):
    def drop(r):
        if r["case_id"] == "transformer:small-seq4096-fp16" and r["unit"] == "bytes":
            r.update(metric="run", value=None, unit="", status="OOM")

    assert main(["compare", str(FIXTURE), variant(tmp_path, drop), "--fail", "vram:5%"]) == 1
    assert "absent" in capsys.readouterr().out


def test_without_gates_it_reports_and_passes(tmp_path, capsys):
    assert main(["compare", str(FIXTURE), variant(tmp_path, scale("bytes", 2.0))]) == 0
    assert "+100.0%" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("vram:5", "'vram:5' is not KIND:PERCENT%"),
        ("vram", "'vram' is not KIND:PERCENT%"),
        ("disk:5%", "'disk:5%': unknown kind 'disk'"),
        ("tokens_per_s:+5%", "'tokens_per_s:+5%': tokens_per_s regresses when it falls"),
        ("vram:-5%", "'vram:-5%': vram regresses when it rises"),
    ],
)
def test_bad_fail_spec_is_an_argparse_error_naming_the_value(spec, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(FIXTURE), str(FIXTURE), "--fail", spec])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --fail" in err and message in err


def test_unreadable_results_file_is_a_usage_error(tmp_path, capsys):
    assert main(["compare", str(FIXTURE), str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.json' does not exist" in err


# --- perplexity: the gate's metric, not the untrained control's -------------------------------

PPL_RUN = FIXTURE.parents[3] / "reports/results/perplexity/20261121T083759Z-bf13e78.json"


def ppl_variant(tmp_path: Path, name: str, **values) -> str:
    """The committed perplexity run with phase2's records set to `values` (metric → value)."""
    doc = json.loads(PPL_RUN.read_text())
    for r in doc["records"]:
        if r["model"] == "phase2" and r["metric"] in values:
            r["value"] = values[r["metric"]]
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_ppl_gate_fails_on_the_degradation(tmp_path, capsys):
    old = ppl_variant(tmp_path, "old.json", ppl_degradation=0.03)
    new = ppl_variant(tmp_path, "new.json", ppl_degradation=0.10)
    assert main(["compare", old, new, "--fail", "ppl:2%"]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "REGRESSION" in line]
    assert len(rows) == 1 and "ppl_degradation" in rows[0] and "phase2:small" in rows[0]
    # The PPL ratio to the baseline, 1 + degradation, rose 1.10 / 1.03 − 1 = 6.8 %.
    assert "+6.8%" in rows[0]
    assert main(["compare", old, new, "--fail", "ppl:7%"]) == 0


def test_ppl_gate_ignores_the_untrained_control(tmp_path, capsys):
    old = ppl_variant(tmp_path, "old.json", control_ppl=8593.0)
    new = ppl_variant(tmp_path, "new.json", control_ppl=20000.0)
    assert main(["compare", old, new, "--fail", "ppl:2%"]) == 0
    out = capsys.readouterr().out
    assert "control_ppl" not in out
    assert "no regression beyond ppl +2%" in out


# --- nothing to compare, and runs that differ --------------------------------------------------


def test_files_sharing_no_case_are_a_usage_error(capsys):
    assert main(["compare", str(FIXTURE), str(PPL_RUN), "--fail", "vram:5%"]) == 2
    captured = capsys.readouterr()
    assert "muse compare: the two results files share no case: nothing to compare" in captured.err
    assert "memory, scaling" in captured.err and "perplexity on phase1:10gb-bf16" in captured.err
    assert "no regression" not in captured.out


def test_a_gate_with_nothing_to_gate_is_said(capsys):
    assert main(["compare", str(FIXTURE), str(FIXTURE), "--fail", "vram:5%", "--fail",
                 "ppl:2%"]) == 0
    captured = capsys.readouterr()
    assert "warning: --fail ppl: neither file has a ppl_degradation record" in captured.err
    assert "no regression beyond vram +5%" in captured.out


def test_gates_with_nothing_to_gate_at_all_are_a_usage_error(capsys):
    assert main(["compare", str(FIXTURE), str(FIXTURE), "--fail", "ppl:2%"]) == 2
    err = capsys.readouterr().err
    assert "--fail ppl: neither file has a ppl_degradation record: nothing to gate" in err


def test_runs_on_other_gpus_dtypes_or_batches_are_warned(tmp_path, capsys):
    def elsewhere(doc):
        doc["environment"]["gpu_names"] = ["NVIDIA H100 80GB HBM3"]
        for r in doc["records"]:
            r["batch"] = 4

    doc = json.loads(FIXTURE.read_text())
    elsewhere(doc)
    new = tmp_path / "new.json"
    new.write_text(json.dumps(doc))
    assert main(["compare", str(FIXTURE), str(new), "--fail", "vram:5%"]) in (0, 1)
    err = capsys.readouterr().err
    assert "warning: GPUs differ: NVIDIA H200 (old) against NVIDIA H100 80GB HBM3 (new)" in err
    assert "warning: batch sizes differ: 1 (old) against 4 (new)" in err
    assert "dtypes differ" not in err


def test_runs_alike_get_no_warning(capsys):
    assert main(["compare", str(FIXTURE), str(FIXTURE), "--fail", "vram:5%"]) == 0
    assert "warning" not in capsys.readouterr().err
