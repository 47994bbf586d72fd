"""`muse report` from an installed wheel, outside the repository: the templates travel as
package data. The wheel is built from a copy of the sources (a build writes build/ and
muse.egg-info beside them) and installed, without dependencies, into a fresh venv that reads
them from this interpreter's site-packages."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from muse.report.render import render

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "reports" / "results" / "latest.json"


def run(*argv, cwd=None) -> str:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def fresh_venv(path: Path) -> Path:
    """A venv with no muse of its own; this interpreter's site-packages are appended to its
    path by a .pth line, which adds the folder without running the .pth files in it (the
    editable install of muse among them)."""
    run(sys.executable, "-m", "venv", "--without-pip", path)
    python = path / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


@pytest.mark.slow  # pip's isolated build env fetches setuptools; a wheel and a venv: ~15 s
def test_report_renders_from_an_installed_wheel_outside_the_repo(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "muse", src / "muse", ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", src, "-w", tmp_path / "dist")
    (wheel,) = (tmp_path / "dist").glob("muse-*.whl")

    python = fresh_venv(tmp_path / "venv")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "--quiet", wheel)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(RESULTS, work / "latest.json")
    where = run(python, "-c",
                "import muse.report.render as r; print(r.__file__); print(r.TEMPLATES)",
                cwd=work).split()
    site = str(tmp_path / "venv")
    assert all(w.startswith(site) for w in where), where  # the wheel's muse, not the repo's

    run(tmp_path / "venv" / "bin" / "muse", "report", "latest.json", "--out", "out", cwd=work)
    monkeypatch.chdir(work)  # the same input, named alike, through the repository's muse
    render([Path("latest.json")], tmp_path / "expected")
    made = sorted(p.relative_to(work / "out") for p in (work / "out").rglob("*") if p.is_file())
    assert made == sorted(p.relative_to(tmp_path / "expected")
                          for p in (tmp_path / "expected").rglob("*") if p.is_file())
    assert Path("REPORT.md") in made
    for text in (p for p in made if p.suffix in (".md", ".csv", ".tex")):
        assert (work / "out" / text).read_text() == (tmp_path / "expected" / text).read_text()
    assert "<html" in (work / "out" / "report.html").read_text()
