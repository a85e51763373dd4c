"""A run is exactly what it says: the request record names, keys and builds every output; nothing is reused
for another request, nothing overwrites another request's or input's files, completion is per output."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from conftest import invoke, read_manifest as manifest, said as text, write_image
from vitexplain import AttentionRollout, GradientRollout
from vitexplain.io.inputs import load_rgb
from vitexplain.io.outputs import OutputWriter, digest
from vitexplain.models import build_model, plan_model
from vitexplain.io.preprocess import to_model_input
from vitexplain.run.options import RenderOptions, SweepOptions
from vitexplain.run.pipeline import explain_paths
from vitexplain.run.request import Request



def fingerprints(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file's modification time and content hash (the manifest aside)."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in folder.iterdir() if p.name != "manifest.jsonl" and not p.name.startswith(".")}


@pytest.fixture
def checkpoint(tmp_path):
    """``checkpoint(name, seed)`` → (model, path): a random-init timm model saved as a state dict."""

    def save(name: str = "test_vit", seed: int = 0):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=5).eval()
        path = tmp_path / f"{name}-{seed}.pth"
        torch.save(model.state_dict(), path)
        return model, path

    return save


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    write_image(folder / "a.png", (40, 56), seed=1)
    write_image(folder / "b.png", (32, 32), seed=2)
    return folder


def test_model_and_checkpoint_changes_compute_new_outputs_and_never_overwrite(tmp_path, images, checkpoint):
    out = tmp_path / "out"
    first_model, first = checkpoint("test_vit", seed=0)
    second_model, second = checkpoint("test_vit", seed=1)
    other_model, other = checkpoint("test_vit4", seed=2)
    runs = [("test_vit", first, first_model), ("test_vit", second, second_model), ("test_vit4", other, other_model)]
    seen: dict[str, tuple[int, str]] = {}
    for index, (name, path, model) in enumerate(runs):
        result = invoke("rollout", images, "--model", name, "--checkpoint", path, "-o", out, "--save-raw")
        assert result.exit_code == 0, result.output
        assert "2 images → 2 outputs" in text(result) and "already complete" not in text(result)
        now = fingerprints(out)
        assert all(now[n] == f for n, f in seen.items())  # no earlier request's file was touched
        assert len(now) == len(seen) + 4  # two overlays and two raw masks more
        seen = now
        entries = [e for e in manifest(out) if e["request"]["model"]["checkpoint"] == str(path)]
        assert len(entries) == 2
        for entry in entries:
            assert entry["request"]["model"]["name"] == name
            assert entry["request"]["model"]["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            pixels = to_model_input(load_rgb(entry["input"]), plan_model(name, checkpoint=path).preprocessing)[None]
            np.testing.assert_allclose(np.load(entry["raw"]), AttentionRollout(model)(pixels)[0].numpy(),
                                       rtol=1e-5, atol=1e-6)
    assert len({e["request"]["key"] for e in manifest(out)}) == 3
    again = invoke("rollout", images, "--model", "test_vit", "--checkpoint", second, "-o", out, "--save-raw")
    assert again.exit_code == 0 and "2 already complete, skipped" in text(again)
    assert fingerprints(out) == seen  # an identical rerun writes nothing


def test_every_output_option_computes_into_files_of_its_own(tmp_path, images, checkpoint):
    _, path = checkpoint()
    out = tmp_path / "out"
    common = ["--model", "test_vit", "--checkpoint", path, "-o", out]
    variants = [[], ["--format", "jpg"], ["--save-raw"], ["--colormap", "gray"], ["--alpha", "0.3"],
                ["--max-side", "24"], ["--stretch"], ["--fusion", "max"], ["--discard-ratio", "0.5"]]
    seen: dict[str, tuple[int, str]] = {}
    for variant in variants:
        result = invoke("rollout", images, *common, *variant)
        assert result.exit_code == 0, (variant, result.output)
        assert "2 images → 2 outputs" in text(result), (variant, result.output)
        now = fingerprints(out)
        assert all(now[n] == f for n, f in seen.items()), variant
        assert len(now) > len(seen), variant
        seen = now
    for variant in variants:  # and each one again: all done
        result = invoke("rollout", images, *common, *variant)
        assert "2 already complete" in text(result), variant
    assert fingerprints(out) == seen
    entries = manifest(out)
    assert len(entries) == 2 * len(variants) and len({e["request"]["key"] for e in entries}) == len(variants)
    small = [e for e in entries if e["request"]["render"]["max_side"] == 24]
    assert all(max(load_rgb(e["overlay"]).shape[:2]) == 24 for e in small)


def test_a_sweep_with_other_ratios_or_outputs_is_another_request(tmp_path, images, checkpoint):
    model, path = checkpoint()
    out = tmp_path / "out"
    common = ["sweep", images / "a.png", "--model", "test_vit", "--checkpoint", path, "-o", out, "--save-raw"]
    for ratios in ("0,0.5,0.9", "0,0.1,0.9"):
        result = invoke(*common, "--ratios", ratios)
        assert result.exit_code == 0 and "1 image → 1 output" in text(result), result.output
    for extra in (["--grid"], ["--fps", "2"]):
        result = invoke(*common, "--ratios", "0,0.1,0.9", *extra)
        assert result.exit_code == 0 and "1 image → 1 output" in text(result), result.output
    entries = manifest(out)
    assert len({e["gif"] for e in entries}) == 4 and len({e["raw"] for e in entries}) == 4
    pixels = to_model_input(load_rgb(images / "a.png"), plan_model("test_vit", checkpoint=path).preprocessing)[None]
    for entry in entries:
        ratios = entry["request"]["sweep"]["ratios"]
        expected = AttentionRollout(model).explain(pixels, discard_ratios=ratios).masks[0, 0].numpy()
        np.testing.assert_allclose(np.load(entry["raw"]), expected, rtol=1e-5, atol=1e-6)
    assert [e["request"]["sweep"]["grid"] for e in entries].count(True) == 1


def test_same_stem_from_another_folder_in_a_later_run_gets_its_own_files(tmp_path, checkpoint):
    model, path = checkpoint()
    out = tmp_path / "out"
    write_image(tmp_path / "a" / "cat.png", (40, 40), seed=1)
    write_image(tmp_path / "b" / "cat.png", (40, 40), seed=2)
    for folder in ("a", "b"):
        result = invoke("rollout", tmp_path / folder / "cat.png", "--model", "test_vit", "--checkpoint", path,
                        "-o", out, "--save-raw")
        assert result.exit_code == 0, result.output
    first, second = manifest(out)
    assert first["input"] == str(tmp_path / "a" / "cat.png") and second["input"] == str(tmp_path / "b" / "cat.png")
    assert first["name"] == "cat_rollout_mean_d0.9" and second["name"].startswith("cat_rollout_mean_d0.9-")
    prep = plan_model("test_vit", checkpoint=path).preprocessing
    for entry in (first, second):  # each entry still describes its own input's files
        pixels = to_model_input(load_rgb(entry["input"]), prep)[None]
        np.testing.assert_allclose(np.load(entry["raw"]), AttentionRollout(model)(pixels)[0].numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_names_taken_by_files_already_in_out_are_never_overwritten(tmp_path, checkpoint):
    _, path = checkpoint()
    out = tmp_path / "out"
    out.mkdir()
    image = tmp_path / "in" / "cat.png"
    write_image(image, (40, 40))
    request_key = Request.create("rollout", plan_model("test_vit", checkpoint=path)).key
    hashed = f"cat_rollout_mean_d0.9-{digest(repr((str(image), request_key, 0)))}"
    (out / "cat_rollout_mean_d0.9.png").write_bytes(b"the user's own file")
    (out / f"{hashed}.npy").write_bytes(b"another one")
    result = invoke("rollout", image, "--model", "test_vit", "--checkpoint", path, "-o", out)
    assert result.exit_code == 0, result.output
    (entry,) = manifest(out)
    assert entry["name"] == f"{hashed}-2"
    assert (out / "cat_rollout_mean_d0.9.png").read_bytes() == b"the user's own file"
    assert (out / f"{hashed}.npy").read_bytes() == b"another one"


def test_symlinked_inputs_are_inputs_of_their_own_and_resume_after_an_interruption(tmp_path, checkpoint, monkeypatch):
    import vitexplain.run.pipeline as pipeline

    _, path = checkpoint()
    target = tmp_path / "one.png"
    write_image(target, (32, 32))
    links = tmp_path / "links"
    links.mkdir()
    for index in range(12):
        (links / f"link{index:02d}.png").symlink_to(target)
    args = ["rollout", links, "--model", "test_vit", "--checkpoint", path, "-o", tmp_path / "out", "-b", "1"]
    real_loader = pipeline.make_loader

    def interrupted_after_four(*a, **k):
        for index, batch in enumerate(real_loader(*a, **k)):
            if index == 4:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(pipeline, "make_loader", interrupted_after_four)
    assert invoke(*args).exit_code == 130
    assert len(manifest(tmp_path / "out")) == 4
    monkeypatch.setattr(pipeline, "make_loader", real_loader)
    rerun = invoke(*args)
    assert rerun.exit_code == 0 and "8 images → 8 outputs" in text(rerun) and "4 already complete" in text(rerun)
    entries = manifest(tmp_path / "out")
    assert sorted(Path(e["input"]).name for e in entries) == [f"link{i:02d}.png" for i in range(12)]
    assert len({e["overlay"] for e in entries}) == 12


def test_completion_is_counted_per_distinct_output(tmp_path, images, checkpoint):
    _, path = checkpoint()
    out = tmp_path / "out"
    args = ["grad-rollout", images / "a.png", "--model", "test_vit", "--checkpoint", path, "-o", out,
            "-c", "1", "-c", "2"]
    assert invoke(*args).exit_code == 0
    one, two = manifest(out)
    assert (one["output"], one["target"], two["output"], two["target"]) == (0, 1, 1, 2)
    stamp = os.stat(one["overlay"]).st_mtime_ns
    Path(two["overlay"]).unlink()  # class 2's output lost, class 1's line twice
    (out / "manifest.jsonl").write_text(json.dumps(one) + "\n" + json.dumps(one) + "\n")
    rerun = invoke(*args)
    assert rerun.exit_code == 0 and "1 image → 1 output" in text(rerun), rerun.output
    entries = manifest(out)
    assert [e["target"] for e in entries] == [1, 1, 2] and entries[2]["overlay"] == two["overlay"]
    assert os.stat(one["overlay"]).st_mtime_ns == stamp  # the complete output was not written again


def test_files_under_out_are_never_inputs(tmp_path, images, checkpoint, monkeypatch):
    _, path = checkpoint()
    for args in (["-o", images / "out"], []):  # --out inside the inputs; `vitexplain rollout .` with the default --out
        if not args:
            images = tmp_path / "second"
            write_image(images / "a.png", (40, 56), seed=1)
            write_image(images / "b.png", (32, 32), seed=2)
        monkeypatch.chdir(images)
        command = ["rollout", "." if not args else images, "--model", "test_vit", "--checkpoint", path, *args]
        for attempt in range(2):
            result = invoke(*command)
            assert result.exit_code == 0, result.output
            assert ("2 images → 2 outputs" if attempt == 0 else "2 already complete") in text(result)
        out = images / "out" if args else images / "vitexplain-out"
        assert sorted(Path(e["input"]).name for e in manifest(out)) == ["a.png", "b.png"]
    refused = invoke("rollout", images / "vitexplain-out" / "a_rollout_mean_d0.9.png", "--model", "test_vit",
                     "--checkpoint", path)
    assert refused.exit_code == 1 and "inside the output folder (--out)" in text(refused)


def test_the_python_api_cannot_label_one_method_and_compute_another(tmp_path, images, checkpoint):
    model, path = checkpoint()
    plan = plan_model("test_vit", checkpoint=path)
    request = Request.create("rollout", plan, render=RenderOptions(save_raw=True), fusion="max", discard_ratio=0.5)
    assert request.label(None) == "rollout_max_d0.5"
    assert request.explainer(model).settings == {"fusion": "max", "discard_ratio": 0.5}
    summary = explain_paths(request, build_model(plan), sorted(images.iterdir()), OutputWriter(tmp_path / "out"))
    assert summary.outputs == 2
    for entry in summary.records:
        pixels = to_model_input(load_rgb(entry["input"]), plan.preprocessing)[None]
        expected = AttentionRollout(model, fusion="max", discard_ratio=0.5)(pixels)[0].numpy()
        np.testing.assert_allclose(np.load(entry["raw"]), expected, rtol=1e-5, atol=1e-6)
        assert entry["name"].endswith("_rollout_max_d0.5") and entry["request"]["params"] == request.settings
    with pytest.raises(TypeError, match="takes a Request"):
        explain_paths(AttentionRollout(model, "mean", 0.0), model, [images / "a.png"], OutputWriter(tmp_path / "x"))


def test_request_key_and_labels(tmp_path, checkpoint):
    _, path = checkpoint()
    plan = plan_model("test_vit", checkpoint=path)
    base = Request.create("rollout", plan)
    assert base.key == Request.create("rollout", plan, fusion="mean", discard_ratio=0.9).key  # defaults are values
    moved = tmp_path / "moved.pth"
    moved.write_bytes(path.read_bytes())
    assert Request.create("rollout", plan_model("test_vit", checkpoint=moved)).key == base.key  # same content
    changes = [
        Request.create("rollout", plan, fusion="max"),
        Request.create("rollout", plan, discard_ratio=0.5),
        Request.create("flow", plan),
        Request.create("rollout", plan, amp=True),
        Request.create("rollout", plan, render=RenderOptions(image_format="jpg")),
        Request.create("rollout", plan, stretch=True),
        Request.create("rollout", plan, sweep=SweepOptions((0.0, 0.5))),
        Request.create("rollout", plan_model("test_vit", pretrained=False)),
        Request.create("grad-rollout", plan),
        Request.create("grad-rollout", plan, classes=[3]),
    ]
    assert len({r.key for r in changes} | {base.key}) == len(changes) + 1
    assert base.label(None) == "rollout_mean_d0.9"
    assert Request.create("grad-rollout", plan, classes=[3]).label(3) == "grad-rollout_mean_d0.9_c3"
    assert Request.create("flow", plan, solver="networkx").label(None) == "flow_mean_d0.9"  # exact either way
    assert Request.create("rollout", plan, sweep=SweepOptions((0.0, 0.45, 0.9)), fusion="max").label(None) \
        == "rollout-sweep_max_r0-0.9x3"
    assert Request.create("flow", plan).render.stretch is True and base.render.stretch is False
    for bad, message in [(dict(fusion="median"), "fusion must be one of mean, max, min"),
                         (dict(discard_ratio=1.0), "discard_ratio must be in [0, 1), got 1.0"),
                         (dict(classes=[9]), "class index 9 is out of range")]:
        method = "grad-rollout" if "classes" in bad else "rollout"
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            Request.create(method, plan, **bad)
    with pytest.raises(TypeError, match="has no parameter 'solver'"):
        Request.create("rollout", plan, solver="dinic")
    with pytest.raises(ValueError, match="--class applies to class-specific methods"):
        Request.create("rollout", plan, classes=[1])
    record = base.record()
    assert record["key"] == base.key and record["model"]["checkpoint"] == str(path)
    assert json.loads(json.dumps(record)) == record  # plain JSON


def test_gradient_rollout_request_builds_gradient_rollout(checkpoint):
    model, path = checkpoint()
    explainer = Request.create("grad-rollout", plan_model("test_vit", checkpoint=path), classes=[2]).explainer(model)
    assert type(explainer) is GradientRollout and explainer.settings == {"fusion": "mean", "discard_ratio": 0.9}
