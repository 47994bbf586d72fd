"""scripts/step_variants.py: a bad variant, seq or machine is one line and exit status 2,
named before anything runs."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "step_variants.py"
_spec = importlib.util.spec_from_file_location("step_variants", _PATH)
step_variants = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_variants)


@pytest.mark.parametrize("argv, named", [
    (["phase8:small {\"recompute_chunk\": true}"], "'recompute_chunk'"),
    (["phase9:small"], "'phase9'"),
    (["phase8:small {not json"], "Expecting property name"),
    (["{\"decay\": \"none\"}"], "follow no model spec"),
])
def test_a_bad_variant_is_named(argv, named, capsys, tmp_path):
    assert step_variants.main([*argv, "--seq", "4096", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("step_variants: ") and named in err and err.count("\n") == 1


def test_a_seq_that_does_not_divide_the_step_is_named(capsys, tmp_path):
    argv = ["phase8:small", "--seq", "5000", "--out", str(tmp_path / "x")]
    assert step_variants.main(argv) == 2
    assert "[5000]" in capsys.readouterr().err


def test_overrides_as_their_own_argument_join_the_spec_before_them():
    from muse.models.registry import parse_variants

    assert parse_variants(["phase8:small", '{"recompute_chunks": true}', "phase7"]) \
        == [("phase8:small", {"recompute_chunks": True}), ("phase7", {})]
