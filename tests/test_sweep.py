"""Discard-ratio sweeps: ratio parsing, one capture for all ratios, GIF frames equal single runs."""
from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import write_image
from vitexplain import AttentionFlow, AttentionRollout, GradientRollout, load_model
from vitexplain.cli import app
from vitexplain.render.overlay import contact_sheet
from vitexplain.run.options import parse_ratios, ratios_tag

runner = CliRunner()


def test_parse_ratio_lists_and_ranges():
    assert parse_ratios("0,0.5,0.9") == (0.0, 0.5, 0.9)
    assert parse_ratios(" 0.25 ") == (0.25,)
    assert parse_ratios("0:0.9:4") == (0.0, 0.3, 0.6, 0.9)
    assert parse_ratios("0:0.99:20")[-1] == 0.99 and len(parse_ratios("0:0.99:20")) == 20
    assert parse_ratios("0.5:0.5:1") == (0.5,)
    assert ratios_tag(parse_ratios("0:0.99:20")) == "r0-0.99x20"


@pytest.mark.parametrize("text, message", [
    ("0:1:5", "must be in [0, 1), got 1"),
    ("0.5,1.2", "must be in [0, 1), got 1.2"),
    ("-0.1,0.5", "must be in [0, 1), got -0.1"),
    ("0.5;0.9", "expected a list like 0,0.5,0.9 or a range START:STOP:COUNT"),
    ("a,b", "expected a list"),
    ("0.5,", "expected a list"),
    ("0:0.9", "expected a list"),
    ("0:0.9:2.5", "expected a list"),
    ("0:0.9:0", "COUNT must be at least 1"),
    ("", "expected a list"),
])
def test_bad_ratios_are_rejected_clearly(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_ratios(text)


@pytest.mark.parametrize("explainer_class", [AttentionRollout, GradientRollout, AttentionFlow])
def test_one_capture_serves_every_ratio(explainer_class):
    model = load_model("test_vit", pretrained=False)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    images = torch.randn(3, 3, 160, 160)
    ratios = (0.0, 0.3, 0.6, 0.9)
    try:
        swept = explainer_class(model, "max").explain(images, discard_ratios=ratios)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert swept.masks.shape == (3, 1, 4, 10, 10) and swept.discard_ratios == ratios
    for k, ratio in enumerate(ratios):
        torch.testing.assert_close(swept.masks[:, 0, k], explainer_class(model, "max", ratio)(images))


def test_sweep_gif_frames_match_single_rollouts(tmp_path, save_test_vit):
    _, checkpoint = save_test_vit()
    image = tmp_path / "photo.png"
    write_image(image, (60, 90))
    common = ["--model", "test_vit", "--checkpoint", str(checkpoint), "--fusion", "max", "--save-raw"]
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(image), "-o", str(out), "--ratios", "0,0.5,0.9", "--grid", "--fps", "5", *common])
    assert result.exit_code == 0, result.output
    (entry,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert entry["request"]["method"] == "rollout" and entry["request"]["sweep"]["ratios"] == [0.0, 0.5, 0.9]
    assert entry["gif"].endswith("photo_rollout-sweep_max_r0-0.9x3.gif")
    frames = iio.imread(entry["gif"], index=None)
    assert frames.shape[0] == 3 and frames.shape[1:3] == (60, 90)
    with Image.open(entry["gif"]) as gif:
        assert gif.info["loop"] == 0 and gif.info["duration"] == 200
    assert not np.array_equal(frames[0], frames[2])
    raw = np.load(entry["raw"])
    assert raw.shape == (3, 10, 10) and raw.dtype == np.float32
    sheet = iio.imread(entry["grid"])
    assert sheet.shape[:2] == (2 * 60 + 4, 2 * 90 + 4)
    for k, ratio in enumerate(["0", "0.5", "0.9"]):
        single = tmp_path / f"single{ratio}"
        result = runner.invoke(app, ["rollout", str(image), "-o", str(single), "--discard-ratio", ratio, *common])
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(raw[k], np.load(single / f"photo_rollout_max_d{ratio}.npy"))


def test_sweep_needs_something_to_write_and_class_only_for_grad(tmp_path, save_test_vit):
    _, checkpoint = save_test_vit()
    image = tmp_path / "photo.png"
    write_image(image)
    common = [str(image), "--model", "test_vit", "--checkpoint", str(checkpoint), "-o", str(tmp_path / "o")]
    nothing = runner.invoke(app, ["sweep", *common, "--no-gif"])
    assert nothing.exit_code == 2 and "nothing to write" in nothing.output
    wrong_class = runner.invoke(app, ["sweep", *common, "--class", "1"])
    assert wrong_class.exit_code == 2 and "--class applies to class-specific methods" in " ".join(wrong_class.output.split())
    bad_ratios = runner.invoke(app, ["sweep", *common, "--ratios", "0:2:3"])
    assert bad_ratios.exit_code == 2 and "must be in [0, 1)" in bad_ratios.output
    grad = runner.invoke(app, ["sweep", *common, "--method", "grad-rollout", "--class", "1", "--ratios", "0,0.5"])
    assert grad.exit_code == 0, grad.output
    assert (tmp_path / "o" / "photo_grad-rollout-sweep_mean_r0-0.5x2_c1.gif").is_file()


def test_contact_sheet_tiles_row_by_row():
    frames = [np.full((2, 3, 3), v, dtype=np.uint8) for v in (10, 20, 30)]
    sheet = contact_sheet(frames, gap=1)
    assert sheet.shape == (5, 7, 3)
    assert sheet[0, 0, 0] == 10 and sheet[0, 4, 0] == 20 and sheet[3, 0, 0] == 30 and sheet[3, 4, 0] == 255
