"""The command line end to end, on generated images and a random-init checkpoint."""
from __future__ import annotations

import json
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_image
from vitexplain import AttentionRollout, GradientRollout, preprocessing_for
from vitexplain.cli import app
from vitexplain.io.inputs import load_rgb
from vitexplain.io.outputs import digest
from vitexplain.io.preprocess import to_model_input

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def folder(tmp_path):
    """Three images in nested folders, two sharing the stem 'cat'."""
    images = tmp_path / "images"
    write_image(images / "cat.png", (48, 64), seed=1)
    write_image(images / "sub" / "cat.jpg", (90, 40), seed=2)
    write_image(images / "sub" / "dog.png", (33, 33), seed=3)
    (images / "notes.txt").write_text("not an image")
    return images


def test_rollout_writes_overlays_raw_masks_and_manifest(tmp_path, folder, save_test_vit):
    model, checkpoint = save_test_vit()
    out = tmp_path / "out"
    result = invoke("rollout", folder, "--model", "test_vit", "--checkpoint", checkpoint, "--out", out,
                    "--fusion", "max", "--discard-ratio", "0.5", "--save-raw", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    entries = manifest(out)
    assert len(entries) == 3
    assert len({e["overlay"] for e in entries}) == 3  # same stem, distinct files
    explainer = AttentionRollout(model.eval(), "max", 0.5)
    prep = preprocessing_for(model)
    for entry in entries:
        request = entry["request"]
        assert request["method"] == "rollout" and request["params"] == {"fusion": "max", "discard_ratio": 0.5}
        assert entry["target"] is None and entry["predicted_name"] == f"class_{entry['predicted']}"
        original = load_rgb(entry["input"])
        assert iio.imread(entry["overlay"]).shape == original.shape  # drawn at the image's own size
        raw = np.load(entry["raw"])
        assert raw.dtype == np.float32 and raw.shape == (10, 10)
        expected = explainer(to_model_input(original, prep)[None])[0].numpy()
        np.testing.assert_allclose(raw, expected, rtol=1e-5, atol=1e-6)
        assert entry["overlay"] == str(out / f"{entry['name']}.png") and entry["raw"] == str(out / f"{entry['name']}.npy")
    names = sorted(e["name"] for e in entries)
    # the two cats share a stem: each gets its identity's hash after it, whichever is written first
    assert names[2] == "dog_rollout_max_d0.5"
    assert all(re.fullmatch(r"cat_rollout_max_d0\.5-[0-9a-f]{8}", name) for name in names[:2])
    for entry in [e for e in entries if Path(e["input"]).name == "cat.png"]:
        identity = (entry["input"], entry["request"]["key"], 0)
        assert entry["name"] == f"cat_rollout_max_d0.5-{digest(repr(identity))}"
    assert "3 images → 3 outputs" in result.output


def test_grad_rollout_one_output_per_class(tmp_path, folder, save_test_vit):
    model, checkpoint = save_test_vit(num_classes=5)
    out = tmp_path / "out"
    result = invoke("grad-rollout", folder / "sub" / "dog.png", "--model", "test_vit", "--checkpoint", checkpoint,
                    "-o", out, "--class", "3", "--class", "class_1", "--save-raw")
    assert result.exit_code == 0, result.output
    entries = manifest(out)
    assert [e["target"] for e in entries] == [3, 1]
    assert [e["target_name"] for e in entries] == ["class_3", "class_1"]
    assert entries[0]["overlay"].endswith("dog_grad-rollout_mean_d0.9_c3.png")
    pixels = to_model_input(load_rgb(folder / "sub" / "dog.png"), preprocessing_for(model))[None]
    with torch.no_grad():
        logits = model.eval()(pixels)
    probabilities = logits.softmax(-1)[0]
    assert entries[0]["predicted"] == int(logits.argmax())
    assert entries[0]["target_probability"] == pytest.approx(float(probabilities[3]), rel=1e-5)
    expected = GradientRollout(model)(pixels, target=3)[0].numpy()
    np.testing.assert_allclose(np.load(entries[0]["raw"]), expected, rtol=1e-5, atol=1e-6)


def test_flow_command_matches_the_api_and_stretches_overlays(tmp_path, folder, save_test_vit):
    from vitexplain import AttentionFlow
    from vitexplain.render.overlay import overlay

    model, checkpoint = save_test_vit()
    out = tmp_path / "out"
    image_path = folder / "sub" / "dog.png"
    result = invoke("flow", image_path, "--model", "test_vit", "--checkpoint", checkpoint, "-o", out,
                    "--discard-ratio", "0.5", "--save-raw", "--colormap", "gray")
    assert result.exit_code == 0, result.output
    (entry,) = manifest(out)
    assert entry["request"]["method"] == "flow" and entry["overlay"].endswith("dog_flow_mean_d0.5.png")
    original = load_rgb(image_path)
    expected = AttentionFlow(model.eval(), discard_ratio=0.5)(to_model_input(original, preprocessing_for(model))[None])[0]
    np.testing.assert_allclose(np.load(entry["raw"]), expected.numpy(), rtol=1e-5, atol=1e-6)
    drawn = iio.imread(entry["overlay"])
    np.testing.assert_array_equal(drawn, overlay(original, np.load(entry["raw"]), "gray", 0.5, stretch=True))
    assert not np.array_equal(drawn, overlay(original, np.load(entry["raw"]), "gray", 0.5, stretch=False))


def test_bad_inputs_are_usage_errors_without_traceback(tmp_path, save_test_vit):
    _, checkpoint = save_test_vit()
    image = tmp_path / "a.png"
    write_image(image)
    common = ["--model", "test_vit", "--checkpoint", checkpoint, "-o", tmp_path / "out"]
    cases = [
        (["rollout", tmp_path / "missing.png", *common], 1, "missing.png: does not exist"),
        (["rollout", image, "--discard-ratio", "1.0", *common], 2, "--discard-ratio must be in [0, 1)"),
        (["rollout", image, "--fusion", "median", *common], 2, "median"),
        (["grad-rollout", image, "--class", "9", *common], 2, "out of range"),
        (["rollout", image, "--model", "deit_tiny_patch16_22"], 2, "Did you mean"),
        (["rollout", tmp_path / "out_empty", *common], 1, "out_empty: folder contains no images"),
        (["rollout", image, "--class", "3", *common], 2, "No such option: --class"),
    ]
    (tmp_path / "out_empty").mkdir()
    for args, code, message in cases:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output


def test_no_hub_gives_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = tmp_path / "a.png"
    write_image(image)
    result = invoke("rollout", image, "--model", "test_vit", "-o", tmp_path / "out")
    assert result.exit_code == 2  # a usage error, found before anything is loaded
    text = " ".join(result.output.split())
    assert "could not get pretrained weights for 'test_vit'" in text and "--checkpoint PATH" in text
    assert "Traceback" not in result.output


def test_help_teaches_the_options():
    result = invoke("rollout", "--help")
    text = " ".join(result.output.split())
    for option in ("--fusion", "--discard-ratio", "--checkpoint", "--save-raw", "--colormap", "--device", "mean|max|min"):
        assert option in text
