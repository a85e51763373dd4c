"""Every ```python block of the README runs as written, with pretrained weights from an offline Hugging Face
cache built from ../shared/weights, in a folder laid out like the project's root (its examples/)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import imageio.v3 as iio
import pytest

from conftest import ROOT, build_offline_hf_cache, needs_shared

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@needs_shared
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(tmp_path, index):
    home = build_offline_hf_cache(tmp_path / "hf")
    work = tmp_path / "root"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    check = {
        0: "assert masks.shape == (2, 14, 14) and float(masks.amax()) == 1.0\n"
           "assert cat.shape == (2, 14, 14)\n"
           "assert explanation.masks.shape == (2, 2, 1, 14, 14)\n"
           "assert explanation.targets.tolist() == [[285, 282], [285, 282]]\n",
        1: "assert summary.outputs == 4 and not summary.failures\n",
    }.get(index, "")
    environment = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", BLOCKS[index] + check], cwd=work, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if index == 0:
        picture = iio.imread(work / "vitexplain-out" / "chelsea_rollout.png")
        assert picture.shape == iio.imread(ROOT / "examples" / "images" / "chelsea.png").shape[:2] + (3,)
