"""`make gallery` (behind `make examples`) reproduces every picture the README shows."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from conftest import ROOT, needs_shared

GALLERY = ROOT / "docs" / "gallery"


def second_evaluation(evaluation: Path) -> Path:
    """Where `make gallery` evaluates its second model (the Makefile's EVALUATION_OUT-SECOND_MODEL)."""
    return evaluation.with_name(f"{evaluation.name}-vit_tiny_patch16_224")


def test_readme_shows_exactly_the_committed_gallery():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300  # for users; measurements live in docs/performance.md
    shown = set(re.findall(r"docs/gallery/([\w.\-]+)", readme))
    assert shown == {p.name for p in GALLERY.iterdir()}
    assert sum(p.stat().st_size for p in GALLERY.iterdir()) < 3 * 2**20  # small enough for a README


@needs_shared
@pytest.mark.skipif(shutil.which("make") is None or not (Path(sys.prefix) / "bin" / "vitexplain").exists(),
                    reason="needs make and the installed vitexplain command")
def test_make_gallery_reproduces_the_committed_pictures(tmp_path):
    out, evaluation = tmp_path / "gallery", tmp_path / "evaluation"
    subprocess.run(["make", "-s", "gallery", f"GALLERY={out}", f"EVALUATION_OUT={evaluation}", f"VENV={sys.prefix}"],
                   cwd=ROOT, check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in GALLERY.iterdir())
    # the README's evaluation tables are these evaluations' (the figures up to the last digit's rounding)
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("<!-- evaluation-table:start -->")[1].split("<!-- evaluation-table:end -->")[0]
    shown = "\n".join(line for line in shown.splitlines() if line.startswith("|"))
    made = "\n".join((folder / "summary.md").read_text().strip() for folder in (evaluation, second_evaluation(evaluation)))
    assert [row.split("|")[1] for row in shown.splitlines()] == [row.split("|")[1] for row in made.splitlines()]
    numbers = [[float(x) for x in re.findall(r"\d+\.\d+", text)] for text in (shown, made)]
    assert len(numbers[0]) == len(numbers[1]) > 0
    assert np.allclose(numbers[0], numbers[1], atol=0.011)
    for committed in GALLERY.iterdir():
        expected = iio.imread(committed, index=None).astype(np.int16)
        regenerated = iio.imread(out / committed.name, index=None).astype(np.int16)
        assert regenerated.shape == expected.shape, committed.name
        assert np.abs(regenerated - expected).mean() < 0.5, committed.name  # same pictures, up to float noise
