"""What a plain `pip install muse` gives: the models and the core CLI without any extra, and a
one-line error naming the extra where a feature needs one; pyproject.toml's extras and its one
version source."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import muse
from muse.extras import EXTRA_OF, MissingExtra, needs
from muse.training.data import Corpus, get_tokenizer

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))

# A subprocess where every optional package is absent: None in sys.modules makes its import
# raise ModuleNotFoundError, as on a machine where it was never installed.
WITHOUT_EXTRAS = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import torch
import muse.models
ids = torch.tensor([[1, 2, 3]])
logits = muse.models.build("transformer", "tiny")(ids)
assert logits.shape == (1, 3, muse.models.build("transformer", "tiny").config.vocab_size)
from muse.cli import main
sys.exit(main(["report", {results!r}, "--out", {out!r}]))
"""


def test_models_and_cli_import_without_any_extra_and_report_names_its_extra(tmp_path):
    blocked = sorted({*EXTRA_OF, "_pytest"})
    results = str(REPO / "reports/results/latest.json")
    script = WITHOUT_EXTRAS.format(blocked=blocked, results=results, out=str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "muse report: the report needs jinja2, which is not installed: pip install 'muse[report]'"
    ]
    assert not (tmp_path / "out").exists()


def test_a_missing_tokenizers_names_the_data_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    corpus = Corpus("c", {"train": "abc", "valid": "a", "test": "b"})
    with pytest.raises(MissingExtra, match=r"^tokenizer 'bpe:300' needs tokenizers, which is not "
                       r"installed: pip install 'muse\[data\]'$"):
        get_tokenizer("bpe:300", corpus, cache_dir=tmp_path)


def test_needs_passes_other_import_errors_through():
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"), needs("x"):
        import no_such_module_here  # noqa: F401
    with pytest.raises(ImportError, match="cannot import name"), needs("x"):
        from json import no_such_name  # noqa: F401


def test_every_optional_package_belongs_to_a_declared_extra():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(EXTRA_OF.values()) <= set(extras)
    for module, extra in EXTRA_OF.items():
        declared = " ".join(extras[extra]).lower().replace("-", "_")
        distribution = {"fla": "flash_linear_attention", "xdist": "pytest_xdist",
                        "pytest_jsonreport": "pytest_json_report"}.get(module, module)
        assert distribution in declared, (module, extra)


def test_runtime_dependencies_are_what_the_models_need():
    names = {dep.split(";")[0].split(">")[0].split("=")[0].strip()
             for dep in PYPROJECT["project"]["dependencies"]}
    assert names == {"torch", "triton", "numpy", "mpmath", "tomli"}


def test_the_test_extra_holds_the_bench_report_and_data_extras_and_pins_fla():
    test = PYPROJECT["project"]["optional-dependencies"]["test"]
    assert "muse[bench,report,data]" in test
    assert "flash-linear-attention==0.6.0; platform_system == 'Linux'" in test


def test_one_version_source():
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "muse.__version__"}
    assert not (REPO / "setup.cfg").exists()
    assert re.fullmatch(r"\d+\.\d+\.\d+", muse.__version__)
