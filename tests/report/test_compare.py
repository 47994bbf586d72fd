"""`muse compare`: the regression gate between two results files."""

import json
from pathlib import Path

import pytest

from muse.cli import main

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "results_h200.json"
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
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(FIXTURE), str(tmp_path / "none.json")])
    assert exc.value.code == 2
    assert "cannot read results file" in capsys.readouterr().err
