"""``evaluate``: every metric equals a plain per-image loop (independent code below) on the test architectures
and the real DeiT-tiny; the run records, resumes, summarises and refuses bad requests as the other commands do."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEIT_WEIGHTS, ROOT, invoke, needs_shared, said, write_image
from test_capture import ARCHITECTURES, images_for
from test_metrics import readings_reference
from vitexplain import get_method, load_model
from vitexplain.io.outputs import OutputWriter
from vitexplain.io.preprocess import load_images
from vitexplain.metrics.baselines import content_key, random_maps
from vitexplain.metrics.perturbation import gaussian_blur
from vitexplain.models import plan_model
from vitexplain.run.evaluation import (
    EVALUATION_NAME, BatchEvaluator, Evaluation, evaluation_rows, parse_methods,
)

EXAMPLES = ROOT / "examples" / "images"
METHODS = [("rollout", {"discard_ratio": 0.5}), ("grad-attention", {}), ("legrad", {"layers": "1"})]


# ---- the independent reference: one image, one map, one step at a time ----

def reference_curve(model, image, baseline, mask, target, steps, insertion):
    """Scores and trapezoid AUC of one deletion or insertion run, written as a loop over steps and patches."""
    gh, gw = mask.shape
    ph, pw = image.shape[1] // gh, image.shape[2] // gw
    values = mask.flatten().tolist()
    order = sorted(range(gh * gw), key=lambda p: (-values[p], p))
    scores = []
    for k in range(steps + 1):
        x = (baseline if insertion else image).clone()
        source = image if insertion else baseline
        for p in order[: k * gh * gw // steps]:
            r, c = divmod(p, gw)
            x[:, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = source[:, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
        with torch.no_grad():
            scores.append(model(x[None]).float().softmax(dim=-1)[0, target].item())
    return scores, float(np.trapezoid(scores, dx=1.0 / steps))


def reference_map(model, name, params, image, target):
    explainer = get_method(name)(model, **params)
    return explainer(image[None], target if explainer.class_specific else None)[0].numpy()


def reference_grid(pixels, layout):
    """One grid pasted tile by tile, each image downscaled on its own."""
    _, height, width = pixels[0].shape
    grid = torch.zeros(3, height, width)
    for tile, index in enumerate(layout):
        small = F.interpolate(pixels[index][None], size=(height // 2, width // 2), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        top, left = (tile // 2) * (height // 2), (tile % 2) * (width // 2)
        grid[:, top:top + height // 2, left:left + width // 2] = small
    return grid


def reference_share(mask, tile):
    gh, gw = mask.shape
    inside = total = 0.0
    for r in range(gh):
        for c in range(gw):
            value = max(float(mask[r, c]), 0.0)
            total += value
            if (r >= gh // 2) * 2 + (c >= gw // 2) == tile:
                inside += value
    return inside / total if total > 0 else 0.0


def check_lines_against_reference(lines, model, pixels_by_key, baseline, steps, methods=METHODS, seed=0):
    """Each method line's raw mask is the method's own map for that image alone, and its curves and AUCs are
    the reference loop's over that mask."""
    params = {get_method(n).name: p for n, p in methods}
    checked = 0
    for line in lines:
        if "method" not in line or "group" in line:  # predictions and grid tiles
            continue
        image = pixels_by_key[line["input"]]
        mask = np.load(line["raw"])
        name = line["method"].split("_")[0]
        if name == "random":
            assert np.array_equal(mask, random_maps([content_key(image)], mask.shape, seed)[0].numpy())
        else:
            expected = reference_map(model, name, params[name], image, line["target"])
            np.testing.assert_allclose(mask, expected, rtol=1e-4, atol=1e-5)
        base = gaussian_blur(image[None])[0] if baseline == "blur" else torch.zeros_like(image)
        for metric in ("deletion", "insertion"):
            scores, area = reference_curve(model, image, base, torch.from_numpy(mask), line["target"], steps,
                                           metric == "insertion")
            assert line["curves"][metric] == pytest.approx(scores, rel=1e-4, abs=1e-6)
            assert line[metric] == pytest.approx(area, rel=1e-4, abs=1e-6)
        checked += 1
    return checked


# ---- the test architectures, through the batch evaluator ----

@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: f"{a[0]}{a[1] or ''}")
def test_deletion_insertion_equal_the_loop_on_test_architectures(architecture, tmp_path):
    name, kwargs, *_ = architecture
    plan = plan_model(name, pretrained=False, **kwargs)
    model = load_model(name, pretrained=False, **kwargs)
    baseline = "blur" if len(kwargs) % 2 else "mean"
    rows = evaluation_rows(METHODS, plan, {}, False, lambda p: p.name)
    evaluation = Evaluation(rows, plan, ("deletion", "insertion"), steps=4, baseline=baseline, save_raw=True)
    pixels = images_for(model, batch=3)
    paths = [tmp_path / f"image{i}.png" for i in range(3)]
    writer = OutputWriter(tmp_path / "out", EVALUATION_NAME)
    lines = BatchEvaluator(evaluation, model, torch.device("cpu"), batch_size=5).image_lines(pixels, paths, {}, writer)
    by_key = {str(path): image for path, image in zip(paths, pixels)}
    assert check_lines_against_reference(lines, model, by_key, baseline, 4) == 3 * len(rows)
    with torch.no_grad():
        top1 = model(pixels).argmax(dim=-1).tolist()
    assert [line["target"] for line in lines if line.get("method") == "random"] == top1
    predictions = [line for line in lines if "method" not in line]
    assert [line["predicted"] for line in predictions] == top1 and len(predictions) == 3


EVEN_GRIDS = [a for a in ARCHITECTURES if a[3][0] % 2 == 0 and a[3][1] % 2 == 0]


@pytest.mark.parametrize("architecture", EVEN_GRIDS, ids=lambda a: f"{a[0]}{a[1] or ''}")
def test_grid_readings_equal_the_loop_on_test_architectures(architecture):
    name, kwargs, *_ = architecture
    plan = plan_model(name, pretrained=False, **kwargs)
    model = load_model(name, pretrained=False, **kwargs)
    rows = evaluation_rows(METHODS, plan, {}, False, lambda p: p.name)
    evaluator = BatchEvaluator(Evaluation(rows, plan, ("grid",)), model, torch.device("cpu"), batch_size=4)
    pixels = images_for(model, batch=4, seed=3)
    layouts = torch.tensor([[0, 1, 2, 3], [2, 3, 0, 1], [3, 0, 1, 2]])
    targets = torch.randint(0, plan.num_classes, (3, 4), generator=torch.Generator().manual_seed(4))
    from vitexplain.metrics.pointing import compose_grids

    readings = evaluator.grid_readings(compose_grids(pixels, layouts), targets)
    assert set(readings) == {"grad-attention_mean_l1_fused", "legrad_l1", "random"}  # rollout: not applicable

    def check(label, mask, g, tile):
        share, hit, auroc = readings_reference(np.asarray(mask, dtype=np.float64), tile)
        assert readings[label]["share"][g, tile].item() == pytest.approx(reference_share(mask, tile), rel=1e-4, abs=1e-6)
        assert readings[label]["share"][g, tile].item() == pytest.approx(share, rel=1e-4, abs=1e-6)
        assert readings[label]["hit"][g, tile].item() == hit
        assert readings[label]["tile_auroc"][g, tile].item() == pytest.approx(auroc, abs=2e-3)  # float32 ties

    for g, layout in enumerate(layouts.tolist()):
        grid = reference_grid(pixels, layout)
        random_map = random_maps([content_key(grid)], plan.grid)[0]
        for tile in range(4):
            target = int(targets[g, tile])
            for label, (method, params) in [("grad-attention_mean_l1_fused", METHODS[1]), ("legrad_l1", METHODS[2])]:
                check(label, reference_map(model, method, params, grid, target), g, tile)
            check("random", random_map, g, tile)


# ---- the real DeiT-tiny on the bundled photos, through the command line ----

@needs_shared
def test_real_deit_evaluation_equals_the_loop(tmp_path):
    out = tmp_path / "eval"
    result = invoke("evaluate", EXAMPLES, "--checkpoint", DEIT_WEIGHTS, "--methods", "rollout[discard-ratio=0.5],"
                    "grad-attention,legrad[layers=1]", "--steps", 5, "--save-raw", "--out", out, "-j", 0)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / EVALUATION_NAME).read_text().splitlines()]
    model = load_model("deit_tiny_patch16_224", checkpoint=DEIT_WEIGHTS)
    from vitexplain import preprocessing_for

    paths = sorted(EXAMPLES.iterdir())
    pixels = load_images(paths, preprocessing_for(model)).pixels
    by_key = {str(path.resolve()): image for path, image in zip(paths, pixels)}
    assert check_lines_against_reference(lines, model, by_key, "mean", 5) == 4 * 4
    # the grid: the four photos differ in class, one group in four arrangements
    grid_lines = [line for line in lines if "group" in line]
    assert len(grid_lines) == 4 * 4 * 3  # arrangements × tiles × (grad-attention, legrad, random)
    keys = [str(path.resolve()) for path in paths]
    for line in grid_lines:
        assert line["group"] == keys
        layout = [keys.index(line["group"][(tile + line["arrangement"]) % 4]) for tile in range(4)]
        assert keys[layout[line["tile"]]] == line["input"]
        grid = reference_grid(pixels, layout)
        if line["method"] == "random":
            mask = random_maps([content_key(grid)], (14, 14))[0].numpy()
        else:
            name = line["method"].split("_")[0]
            mask = reference_map(model, name, dict(METHODS)[name], grid, line["target"])
        assert line["share"] == pytest.approx(reference_share(mask, line["tile"]), rel=1e-4, abs=1e-6)
        _, hit, auroc = readings_reference(np.asarray(mask, dtype=np.float64), line["tile"])
        assert line["hit"] == hit and line["tile_auroc"] == pytest.approx(auroc, abs=2e-3)
    # the summary is the mean of the lines
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["method"]: row for row in summary["methods"]}
    assert list(rows) == ["rollout_mean_d0.5", "grad-attention_mean_l1_fused", "legrad_l1", "random"]
    for label, row in rows.items():
        mine = [line for line in lines if line.get("method") == label and "group" not in line]
        assert row["metrics"]["deletion"]["mean"] == pytest.approx(np.mean([line["deletion"] for line in mine]))
        assert row["metrics"]["deletion"]["count"] == 4
        assert row["metrics"]["deletion"]["low"] <= row["metrics"]["deletion"]["mean"] <= row["metrics"]["deletion"]["high"]
        assert row["curves"]["insertion"] == pytest.approx(np.mean([line["curves"]["insertion"] for line in mine], axis=0))
    assert rows["rollout_mean_d0.5"]["metrics"]["grid"] is None  # class-agnostic: not applicable
    assert rows["random"]["metrics"]["grid"]["count"] == 16
    table = list(csv.reader((out / "summary.csv").open()))
    assert table[0] == ["method", "metric", "mean", "ci_low", "ci_high", "n"]
    assert ["rollout_mean_d0.5", "grid", "", "", "", ""] in table
    assert len(table) == 1 + 4 * 5  # deletion, insertion, and the grid game's share, hit and AUROC
    picture = iio.imread(out / "curves.png")
    assert picture.shape == (400, 1040, 4) or picture.shape == (400, 1040, 3)
    assert "n/a" in said(result) and "random" in said(result)


# ---- the command line: records, resume, failures, refusals ----

@pytest.fixture
def folder(tmp_path):
    for i in range(5):
        write_image(tmp_path / "in" / f"p{i}.png", seed=i)
    return tmp_path / "in"


def evaluate(folder, out, checkpoint, *args):
    return invoke("evaluate", folder, "--model", "test_vit", "--checkpoint", checkpoint, "--out", out,
                  "--steps", 3, "-j", 0, *args)


def read_lines(out):
    return [json.loads(line) for line in (out / EVALUATION_NAME).read_text().splitlines()]


def test_rerun_skips_what_is_done_and_redoes_what_a_stop_left(folder, tmp_path, save_test_vit):
    _, checkpoint = save_test_vit(num_classes=50)
    out = tmp_path / "out"
    first = evaluate(folder, out, checkpoint, "--methods", "rollout,grad-rollout", "--metrics", "deletion,insertion")
    assert first.exit_code == 0, first.output
    lines = read_lines(out)
    assert len(lines) == 5 * (3 + 1)  # (rollout, grad-rollout, random) + the prediction, per image
    summary = (out / "summary.json").read_text()
    again = evaluate(folder, out, checkpoint, "--methods", "rollout,grad-rollout", "--metrics", "deletion,insertion")
    assert again.exit_code == 0 and "5 already complete" in said(again)
    assert len(read_lines(out)) == len(lines) and (out / "summary.json").read_text() == summary
    # a run stopped within an image's lines (one method line and the prediction line missing): that image is
    # done again, writing just what is missing
    text = (out / EVALUATION_NAME).read_text().splitlines()
    last_prediction = max(i for i, line in enumerate(text) if '"kind": "prediction"' in line)
    assert '"kind": "perturbation"' in text[last_prediction - 1]
    (out / EVALUATION_NAME).write_text("\n".join(text[:last_prediction - 1]) + "\n")
    third = evaluate(folder, out, checkpoint, "--methods", "rollout,grad-rollout", "--metrics", "deletion,insertion")
    assert third.exit_code == 0 and "1 image evaluated now" in said(third) and "4 already complete" in said(third)
    assert [json.loads(line)["input"] for line in text[-2:]] == [line["input"] for line in read_lines(out)[-2:]]
    assert len(read_lines(out)) == len(lines)
    before, after = (json.loads(s)["methods"] for s in (summary, (out / "summary.json").read_text()))
    for old_row, new_row in zip(before, after):
        for metric in ("deletion", "insertion"):
            assert new_row["metrics"][metric]["mean"] == pytest.approx(old_row["metrics"][metric]["mean"], rel=1e-5)
    # another setting is another request: computed anew
    other = evaluate(folder, out, checkpoint, "--methods", "rollout,grad-rollout", "--metrics", "deletion,insertion",
                     "--steps", 4)
    assert other.exit_code == 0 and "5 images evaluated now" in said(other)


def test_chefer_protocol_lines_summarise_and_resume(folder, tmp_path, save_test_vit):
    _, checkpoint = save_test_vit(num_classes=50)
    out = tmp_path / "out"
    args = ["--methods", "rollout,grad-rollout", "--metrics", "deletion,positive,negative"]
    assert evaluate(folder, out, checkpoint, *args).exit_code == 0
    lines = [line for line in read_lines(out) if "method" in line]
    assert len(lines) == 5 * 3  # (rollout, grad-rollout, random) per image
    for line in lines:
        for metric in ("positive", "negative"):
            curve = line["curves"][metric]
            assert len(curve) == 10 and curve[0] == 1.0 and set(curve) <= {0.0, 1.0}  # unperturbed: the top-1
            assert line[metric] == pytest.approx(100 * sum((a + b) / 2 * 0.1 for a, b in zip(curve, curve[1:])))
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["methods"]:
        mine = [line for line in lines if line["method"] == row["method"]]
        for metric in ("deletion", "positive", "negative"):
            assert row["metrics"][metric]["mean"] == pytest.approx(np.mean([line[metric] for line in mine]))
    assert "| method | deletion AUC ↓ | positive AUC ↓ | negative AUC ↑ | n |" in (out / "summary.md").read_text()
    again = evaluate(folder, out, checkpoint, *args)
    assert again.exit_code == 0 and "5 already complete" in said(again)


def test_bad_input_is_reported_recorded_and_skipped(folder, tmp_path, save_test_vit):
    _, checkpoint = save_test_vit(num_classes=50)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    result = evaluate(folder, out, checkpoint, "--methods", "rollout", "--metrics", "deletion")
    assert result.exit_code == 1
    assert "broken.png" in said(result) and "1 failed" in said(result) and "5 images evaluated now" in said(result)
    failed = [line for line in read_lines(out) if line["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["input"].endswith("broken.png")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"][0]["metrics"]["deletion"]["count"] == 5


def test_classes_shared_flags_and_raw_masks(folder, tmp_path, save_test_vit):
    _, checkpoint = save_test_vit(num_classes=50)
    out = tmp_path / "out"
    result = evaluate(folder, out, checkpoint, "--methods", "rollout,grad-rollout[discard-ratio=0.2]",
                      "--discard-ratio", 0.7, "--metrics", "insertion", "--class", 3, "--class", 7, "--save-raw",
                      "--baseline", "blur")
    assert result.exit_code == 0, result.output
    lines = [line for line in read_lines(out) if "method" in line]
    assert {line["method"] for line in lines} == {"rollout_mean_d0.7", "grad-rollout_mean_d0.2", "random"}
    assert sorted({(line["output"], line["target"]) for line in lines}) == [(0, 3), (1, 7)]
    assert all(line["request"]["baseline"] == "blur" and "deletion" not in line for line in lines)
    assert all(Path(line["raw"]).is_file() for line in lines) and len(lines) == 5 * 3 * 2
    raw = Path(next(line["raw"] for line in lines if line["method"] == "grad-rollout_mean_d0.2" and line["target"] == 7))
    assert raw.name.endswith("_grad-rollout_mean_d0.2_c7.npy")


def test_grid_only_and_class_agnostic_rows(tmp_path, save_test_vit):
    from PIL import Image

    model, checkpoint = save_test_vit(num_classes=50)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 255, 255), (255, 0, 255)]  # classes 10, 4, 30, 29, 12
    for index, colour in enumerate(colours):
        (tmp_path / "in").mkdir(exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(tmp_path / "in" / f"c{index}.png")
    out = tmp_path / "out"
    result = evaluate(tmp_path / "in", out, checkpoint, "--methods", "rollout,grad-attention", "--metrics", "grid")
    assert result.exit_code == 0, result.output
    lines = read_lines(out)
    assert all("deletion" not in line for line in lines)
    summary = {row["method"]: row["metrics"] for row in json.loads((out / "summary.json").read_text())["methods"]}
    assert summary["rollout_mean_d0.9"] == {"grid": None, "grid_hit": None, "grid_auroc": None}
    from vitexplain.metrics.pointing import image_groups

    predicted = [line["predicted"] for line in lines if "predicted" in line and "group" not in line]
    groups = image_groups(predicted)
    assert len(predicted) == 5 and groups == [(0, 1, 2, 3)]  # the seeded model tells the colours apart
    assert len([line for line in lines if "group" in line]) == 16 * 2  # grad-attention and random
    assert summary["random"]["grid"]["count"] == 16 and summary["grad-attention_mean_l1_fused"]["grid"]["count"] == 16
    assert not (out / "curves.png").exists()  # no curves without deletion or insertion


@pytest.mark.parametrize("args, message", [
    (["--methods", "rollout[fusion=max"], "unbalanced brackets"),
    (["--methods", "rollout[layers=2]"], "rollout has no option 'layers'"),
    (["--methods", "rollout[fusion]"], "write option=value"),
    (["--methods", "rolout"], "unknown method 'rolout'"),
    (["--methods", "rollout,random"], "random baseline is always evaluated"),
    (["--methods", "rollout,rollout[fusion=mean]"], "listed twice"),
    (["--methods", "rollout", "--layers", "2"], "--layers applies to none of the methods"),
    (["--methods", "rollout[discard-ratio=1.5]"], "--discard-ratio must be in [0, 1)"),
    (["--metrics", "deletion,accuracy"], "unknown metric 'accuracy'"),
    (["--metrics", "grid", "--class", "3"], "--class does not apply to the grid"),
    (["--methods", "legrad[layers=9]"], "--layers 9: the model has"),
])
def test_bad_requests_are_one_line_usage_errors(folder, tmp_path, save_test_vit, args, message):
    _, checkpoint = save_test_vit(num_classes=50)
    result = evaluate(folder, tmp_path / "out", checkpoint, *args)
    assert result.exit_code == 2, result.output
    assert message in said(result)
    assert not (tmp_path / "out" / EVALUATION_NAME).exists()


def test_method_list_syntax():
    assert parse_methods("rollout[fusion=max, discard-ratio=0.95], legrad ,chefer[]") == [
        ("rollout", {"fusion": "max", "discard_ratio": "0.95"}), ("legrad", {}), ("chefer", {})]
    with pytest.raises(ValueError, match="unbalanced"):
        parse_methods("rollout]")
