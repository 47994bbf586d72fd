import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from muse.errors import MuseError
from muse.harness.results import (
    SCHEMA_VERSION,
    Record,
    build_document,
    check_writable,
    environment_facts,
    git_facts,
    read_document,
    run_name,
    verdict,
    write_document,
)

FACTS = {"git": {"sha": "1a2b3c4d5e6f" + "0" * 28, "dirty": False}, "environment": {"gpu": None}}
START = datetime(2026, 11, 21, 12, 5, 1, tzinfo=timezone.utc)
END = datetime(2026, 11, 21, 12, 7, 30, tzinfo=timezone.utc)


def make_records():
    return [
        Record("memory", "transformer", "small", "peak_vram_forward_bytes", 1.5e9, "bytes",
               "PASS", params=12_345_678, seq=4096, batch=1, dtype="fp16", device="cuda",
               threshold=8e9, comparison="<=", case_id="transformer:small-seq4096-fp16",
               extra={"reserved_bytes": 2e9, "phases": ["forward"]}),
        Record("scaling", "phase8", "small", "loglog_slope_top", 2.01, "1", "FAIL",
               threshold=1.15, comparison="<="),
        Record("memory", "phase2", "small", "peak_vram_forward_bytes", None, "bytes", "OOM"),
        Record("throughput", "phase2", "small", "tokens_per_s", 1234.5, "tokens/s", "RECORDED"),
        Record("stability", "phase7", "small", "loss_final", 3.2, "1", "INCONCLUSIVE"),
    ]


def make_doc(records=None):
    return build_document(records or make_records(), ["pytest", "bench", "--seq", "4096"],
                          facts=FACTS, started_at=START, finished_at=END)


def test_document_fields():
    doc = make_doc()
    assert doc["schema_version"] == SCHEMA_VERSION == 1
    assert doc["run"] == "20261121T120501Z-1a2b3c4"
    assert doc["command"] == "pytest bench --seq 4096"
    assert doc["started_at"] == "2026-11-21T12:05:01Z"
    assert doc["finished_at"] == "2026-11-21T12:07:30Z"
    assert doc["git"] == FACTS["git"]
    assert doc["summary"] == {"passed": 1, "failed": 2, "inconclusive": 1, "recorded": 1}
    assert [r["passed"] for r in doc["records"]] == [True, False, False, None, None]


def test_round_trip(tmp_path):
    records = make_records()
    path = write_document(make_doc(records), tmp_path / "results")
    assert path == tmp_path / "results" / "20261121T120501Z-1a2b3c4.json"
    doc = read_document(path)
    assert doc["records"] == records
    assert doc["summary"]["passed"] == 1


def test_latest_equals_run_file_and_no_temp_files_remain(tmp_path):
    path = write_document(make_doc(), tmp_path)
    latest = tmp_path / "latest.json"
    assert latest.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "latest.json"])


def test_unwritable_value_leaves_no_file(tmp_path):
    doc = make_doc()
    doc["records"][0]["extra"]["bad"] = object()
    with pytest.raises(TypeError, match="cannot write object"):
        write_document(doc, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_values_round_trip(tmp_path):
    records = [
        Record("gradient_flow", "phase3", "small", "first_layer_grad_norm", v, "1", "FAIL",
               threshold=1e-5, comparison=">=")
        for v in (math.nan, math.inf, -math.inf)
    ]
    path = write_document(make_doc(records), tmp_path)
    stored = json.loads(path.read_text())
    assert [r["value"] for r in stored["records"]] == ["nan", "inf", "-inf"]
    back = read_document(path)["records"]
    assert math.isnan(back[0].value)
    assert back[1].value == math.inf
    assert back[2].value == -math.inf


def test_schema_version_mismatch_raises(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema_version": 2, "records": []}))
    with pytest.raises(ValueError, match="schema_version 2 is not supported"):
        read_document(path)


def test_unknown_record_key_is_named():
    d = make_records()[0].to_dict()
    d["vram_gb"] = 1.5
    with pytest.raises(ValueError, match="unknown record key.*vram_gb"):
        Record.from_dict(d)


def test_passed_is_derived_not_trusted():
    d = make_records()[1].to_dict()
    d["passed"] = True
    assert Record.from_dict(d).passed is False


def test_bad_status_and_comparison_are_rejected():
    with pytest.raises(ValueError, match="'OK'"):
        Record("memory", "m", "p", "x", 1.0, "1", "OK")
    with pytest.raises(ValueError, match="'=='"):
        Record("memory", "m", "p", "x", 1.0, "1", "PASS", threshold=1.0, comparison="==")


@pytest.mark.parametrize(
    "value, comparison, expected",
    [
        (1.0, "<", "PASS"), (2.0, "<", "FAIL"),
        (2.0, "<=", "PASS"), (2.5, "<=", "FAIL"),
        (3.0, ">", "PASS"), (2.0, ">", "FAIL"),
        (2.0, ">=", "PASS"), (1.5, ">=", "FAIL"),
    ],
)
def test_verdict(value, comparison, expected):
    assert verdict(value, 2.0, comparison) == expected


@pytest.mark.parametrize("comparison", ["<", "<=", ">", ">="])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_verdict_non_finite_fails(value, comparison):
    assert verdict(value, 2.0, comparison) == "FAIL"


def test_verdict_unknown_comparison():
    with pytest.raises(ValueError, match="'=<'"):
        verdict(1.0, 2.0, "=<")


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []
    # A directory under a regular file cannot exist, even for root.
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="afile.*is not writable"):
        check_writable(tmp_path / "afile" / "sub")


def test_run_name():
    assert run_name(START, "1a2b3c4d5e") == "20261121T120501Z-1a2b3c4"
    assert run_name(START) == "20261121T120501Z"
    assert run_name(datetime(2026, 11, 21, 12, 5, 1)) == "20261121T120501Z"  # naive = UTC


def test_git_facts_outside_a_repository(tmp_path):
    assert git_facts(cwd=tmp_path) == {"sha": None, "dirty": None}


def test_environment_facts():
    env = environment_facts()
    assert set(env) >= {"python", "platform", "torch", "torch_cuda", "triton", "cuda_available",
                        "gpu_count", "gpu_names", "driver", "hostname"}
    assert env["torch"] == torch.__version__
    assert env["cuda_available"] == torch.cuda.is_available()
    assert env["gpu_count"] == len(env["gpu_names"])
    json.dumps(env)  # must be writable as it stands


def test_git_facts_in_this_repository():
    facts = git_facts(cwd=Path(__file__).parent)
    if facts["sha"] is None:
        pytest.skip("not a git checkout, or git is not installed")
    assert len(facts["sha"]) == 40 and int(facts["sha"], 16) >= 0
    assert isinstance(facts["dirty"], bool)


def test_driver_version_from_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 550.54.15\necho 550.54.15\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    assert environment_facts()["driver"] == "550.54.15"


def test_a_second_run_of_the_same_second_gets_its_own_file(tmp_path):
    first = write_document(make_doc(), tmp_path)
    second = write_document(make_doc(), tmp_path)
    third = write_document(make_doc(), tmp_path)
    assert first.name == "20261121T120501Z-1a2b3c4.json"
    assert second.name == f"20261121T120501Z-1a2b3c4-p{os.getpid()}.json"
    assert len({first, second, third}) == 3
    for path in (first, second, third):
        assert read_document(path)["run"] == path.stem
    assert (tmp_path / "latest.json").read_bytes() == third.read_bytes()


WRITER = """
import sys
from muse.harness.results import Record, build_document, write_document
from datetime import datetime, timezone
when = datetime(2026, 11, 21, 12, 5, 1, tzinfo=timezone.utc)
for i in range(20):
    rec = Record("memory", "transformer", "small", "m", float(i), "1", "RECORDED",
                 case_id=sys.argv[2])
    doc = build_document([rec], ["w"], facts={"git": {"sha": "abcdef0", "dirty": False},
                         "environment": {}}, started_at=when, finished_at=when)
    write_document(doc, sys.argv[1])
"""


def test_two_writers_at_once_lose_and_mix_nothing(tmp_path):
    import subprocess

    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), who])
             for who in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    runs = {path.stem: read_document(path) for path in tmp_path.glob("2026*.json")}
    assert len(runs) == 40  # every run of both writers, each in its own file
    seen = sorted((d["records"][0].case_id, d["records"][0].value) for d in runs.values())
    assert seen == sorted((who, float(i)) for who in "ab" for i in range(20))
    assert all(d["run"] == stem for stem, d in runs.items())
    assert read_document(tmp_path / "latest.json")["records"][0].value == 19.0
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("content, words", [
    ("{", "is not valid JSON (Expecting property name"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", "is not JSON text (byte offset"),
    ("[1, 2]", "schema_version None is not supported"),
    ('{"schema_version": 1, "records": {}}', "records must be a list, got dict"),
    ('{"schema_version": 1, "records": [3]}', "record 0 is not an object, got 3"),
])
def test_unreadable_documents_name_the_file_and_the_fault(tmp_path, content, words):
    path = tmp_path / "r.json"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(MuseError) as info:
        read_document(path)
    assert str(path) in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("field, value, words", [
    ("value", "12", "value must be a number or null, got '12'"),
    ("value", True, "value must be a number or null, got True"),
    ("model", 3, "model must be a string, got 3"),
    ("seq", 1.5, "seq must be an integer or null, got 1.5"),
    ("extra", [], "extra must be an object, got []"),
    ("status", "GREAT", "unknown status 'GREAT'"),
])
def test_records_of_the_wrong_type_are_named(tmp_path, field, value, words):
    doc = json.loads(json.dumps(make_doc(), default=lambda r: r.to_dict()))
    doc["records"][1][field] = value
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(MuseError, match="record 1: record 'loglog_slope_top': ") as info:
        read_document(path)
    assert words in str(info.value)
