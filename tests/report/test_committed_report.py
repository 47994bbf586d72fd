"""The committed reports/ is what `tox -e report` (`muse report` with its defaults) makes from the
committed results: REPORT.md and every table byte for byte, report.html but for the embedded
PNGs (their bytes depend on the matplotlib and FreeType versions), and the same set of plots.
A drift fails here; refresh with `tox -e report` and commit the diff after reading it."""

import re
from pathlib import Path

import pytest

from muse.cli import main

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "reports"
IMAGE = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")

pytestmark = pytest.mark.skipif(not (REPORTS / "results" / "latest.json").is_file(),
                                reason="no committed results beside these tests")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the paths in REPORT.md are relative to the repository, as tox runs it
        assert main(["report", "--out", str(out)]) == 0
    return out


def committed_tables() -> list[str]:
    return sorted(p.name for p in (REPORTS / "tables").iterdir())


@pytest.mark.parametrize("name", ["REPORT.md", *(f"tables/{t}" for t in committed_tables())])
def test_committed_text_is_what_the_command_makes(made, name):
    assert (made / name).read_text(encoding="utf-8") == \
        (REPORTS / name).read_text(encoding="utf-8"), f"reports/{name} is stale: run tox -e report"


def test_same_tables_and_plots(made):
    for sub in ("tables", "plots"):
        assert sorted(p.name for p in (made / sub).iterdir()) == \
            sorted(p.name for p in (REPORTS / sub).iterdir()), sub


def test_committed_html_is_what_the_command_makes_but_for_the_images(made):
    def text(path):
        return IMAGE.sub("data:image/png;base64,…", path.read_text(encoding="utf-8"))

    assert text(made / "report.html") == text(REPORTS / "report.html")
