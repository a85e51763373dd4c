"""Ground-truth metrics (pointing with tolerance, energy, segmentation) against per-pixel loops, annotation
files (Pascal VOC, COCO, masks) and their refusals, through the command line."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import invoke, said, write_image
from vitexplain.io.annotations import AnnotationError, Box, GroundTruth, box_region, read_voc
from vitexplain.metrics.ground_truth import average_precision, energy, pointing_hit, segmentation_scores, upsample


def pointing_loop(heat: np.ndarray, region: np.ndarray, tolerance=15) -> float:
    height, width = heat.shape
    best, where = -math.inf, None
    for y in range(height):
        for x in range(width):
            if heat[y, x] > best:  # the first maximum in row-major order
                best, where = heat[y, x], (y, x)
    for y in range(height):
        for x in range(width):
            if region[y, x] and (y - where[0]) ** 2 + (x - where[1]) ** 2 <= tolerance ** 2:
                return 1.0
    return 0.0


def energy_loop(heat, region) -> float:
    total = inside = 0.0
    for y in range(heat.shape[0]):
        for x in range(heat.shape[1]):
            value = max(float(heat[y, x]), 0.0)
            total += value
            inside += value if region[y, x] else 0.0
    return inside / total if total > 0 else 0.0


def ap_loop(scores, labels) -> float:
    """Average precision as scikit-learn defines it: over the distinct thresholds, highest first."""
    pairs = list(zip(scores.flatten().tolist(), labels.flatten().tolist()))
    positives = sum(labels.flatten().tolist())
    if positives == 0:
        return 0.0
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted({s for s, _ in pairs}, reverse=True):
        chosen = [l for s, l in pairs if s >= threshold]
        precision, recall = sum(chosen) / len(chosen), sum(chosen) / positives
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


def segmentation_loop(heat, mask):
    mean = heat.mean()
    correct = inter_object = union_object = inter_background = union_background = 0
    for y in range(heat.shape[0]):
        for x in range(heat.shape[1]):
            predicted, truth = bool(heat[y, x] > mean), bool(mask[y, x])
            correct += predicted == truth
            inter_object += predicted and truth
            union_object += predicted or truth
            inter_background += (not predicted) and (not truth)
            union_background += (not predicted) or (not truth)
    iou = [i / u if u else 1.0 for i, u in ((inter_object, union_object), (inter_background, union_background))]
    return correct / heat.size, sum(iou) / 2, ap_loop(heat, mask)


def box_loop(boxes, height, width):
    region = np.zeros((height, width), dtype=bool)
    for y in range(height):
        for x in range(width):
            region[y, x] = any(b.x0 <= x + 0.5 < b.x1 and b.y0 <= y + 0.5 < b.y1 for b in boxes)
    return region


def test_metrics_equal_per_pixel_loops_on_synthetic_maps_boxes_and_masks():
    generator = np.random.default_rng(0)
    for case in range(12):
        height, width = 30 + case, 40 - case
        heat = generator.integers(-3, 6, (height, width)).astype(np.float64)  # ties and negatives
        boxes = []
        for _ in range(case % 3 + 1):  # several boxes, some past the border
            (x0, x1), (y0, y1) = sorted(generator.uniform(-5, width + 5, 2)), sorted(generator.uniform(-5, height + 5, 2))
            boxes.append(Box("a", x0, y0, x1, y1))
        region = box_region(boxes, height, width)
        assert np.array_equal(region, box_loop(boxes, height, width))
        mask = generator.random((height, width)) < (0.0 if case == 5 else 0.3)  # case 5: an empty mask
        for where in (region, mask):
            t_heat, t_where = torch.from_numpy(heat), torch.from_numpy(where)
            assert pointing_hit(t_heat, t_where) == pointing_loop(heat, where)
            assert energy(t_heat, t_where) == pytest.approx(energy_loop(heat, where))
        scores = segmentation_scores(torch.from_numpy(heat), torch.from_numpy(mask))
        accuracy, miou, ap = segmentation_loop(heat, mask)
        assert scores["pixel_accuracy"] == pytest.approx(accuracy) and scores["miou"] == pytest.approx(miou)
        assert scores["ap"] == pytest.approx(ap)


def test_pointing_tolerance_at_the_border_by_hand():
    heat = torch.zeros(40, 40)
    heat[0, 20] = 1.0  # the maximum at the top border
    region = torch.zeros(40, 40, dtype=torch.bool)
    region[15, 20] = True  # 15 px below: inside the tolerance
    assert pointing_hit(heat, region) == 1.0
    region[15, 20], region[16, 20] = False, True  # 16 px: outside
    assert pointing_hit(heat, region) == 0.0
    region[12, 29] = True  # 12² + 9² = 225: exactly 15 px
    assert pointing_hit(heat, region) == 1.0
    assert pointing_hit(heat, torch.zeros(40, 40, dtype=torch.bool)) == 0.0  # an empty region never hits


def test_average_precision_by_hand():
    scores, labels = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, False, True, False])
    assert average_precision(scores, labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision(torch.ones(4), labels) == pytest.approx(0.5)  # one threshold: precision 2/4
    assert average_precision(scores, torch.zeros(4, dtype=torch.bool)) == 0.0


def test_upsample_is_bilinear_to_the_image_size():
    maps = torch.arange(4.0).view(1, 2, 2)
    big = upsample(maps, (4, 6))
    assert big.shape == (1, 4, 6) and big[0, 0, 0] == 0 and big[0, -1, -1] == 3


def write_case(tmp_path):
    """Three images with VOC boxes (several, other classes), masks, and one broken annotation of each kind."""
    for index in range(4):
        write_image(tmp_path / "in" / f"p{index}.png", (48, 64), seed=index)
    (tmp_path / "boxes").mkdir()
    (tmp_path / "masks").mkdir()
    for index in range(3):
        (tmp_path / "boxes" / f"p{index}.xml").write_text(
            "<annotation><size><width>64</width><height>48</height></size>"
            + "".join(f"<object><name>{label}</name><bndbox><xmin>{x}</xmin><ymin>{y}</ymin><xmax>{x + 20}</xmax>"
                      f"<ymax>{y + 15}</ymax></bndbox></object>" for label, x, y in
                      [(0, 3, 2), (1, 30, 20), (2, 10, 30), (3, 40, 1), (4, 1, 1)][index:index + 3])
            + "</annotation>")
        mask = np.zeros((48, 64), np.uint8)
        mask[5 + index * 5:30, 10:40 + index] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"p{index}.png")
    (tmp_path / "boxes" / "p3.xml").write_text("<annotation><object><name>0</name></object></annotation>")  # no box
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "masks" / "p3.png")  # does not fit


def test_lines_equal_the_loop_through_the_command_line_and_problems_are_counted_apart(tmp_path, save_test_vit):
    model, checkpoint = save_test_vit()
    write_case(tmp_path)
    out = tmp_path / "out"
    result = invoke("evaluate", tmp_path / "in", "--model", "test_vit", "--checkpoint", checkpoint, "-o", out,
                    "--methods", "grad-attention", "--metrics", "deletion", "--steps", 2, "-j", 0, "--save-raw",
                    "--boxes", tmp_path / "boxes", "--masks", tmp_path / "masks")
    assert result.exit_code == 0, result.output
    text = said(result)
    assert "p3.xml is not a Pascal VOC annotation" in text and "annotation problem" in text
    lines = [json.loads(line) for line in (out / "evaluation.jsonl").read_text().splitlines()]
    ground_truth = GroundTruth(tmp_path / "boxes", tmp_path / "masks")
    checked = 0
    for line in lines:
        if line.get("method") != "grad-attention_mean_l1_fused":
            continue
        stem = line["input"].rsplit("/", 1)[1].removesuffix(".png")
        if stem == "p3":
            assert all(line[name] is None for name in ("pointing", "energy", "pixel_accuracy", "miou", "ap"))
            continue
        heat = upsample(torch.from_numpy(np.load(line["raw"]))[None], (48, 64))[0].numpy().astype(np.float64)
        boxes = [b for b in read_voc(tmp_path / "boxes" / f"{stem}.xml").boxes if int(b.label) == line["target"]]
        mask = ground_truth.mask_for(stem, 48, 64)
        region = box_loop(boxes, 48, 64) if boxes else mask
        assert line["pointing"] == pointing_loop(heat, region)
        assert line["energy"] == pytest.approx(energy_loop(heat, region), rel=1e-4, abs=1e-6)
        accuracy, miou, ap = segmentation_loop(heat, mask)
        assert line["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-3)  # float32 maps against the mean
        assert line["miou"] == pytest.approx(miou, abs=2e-3) and line["ap"] == pytest.approx(ap, abs=2e-3)
        checked += 1
    assert checked == 3
    summary = {row["method"]: row["metrics"] for row in json.loads((out / "summary.json").read_text())["methods"]}
    assert summary["grad-attention_mean_l1_fused"]["pointing"]["count"] == 3  # p3 counted apart
    again = invoke("evaluate", tmp_path / "in", "--model", "test_vit", "--checkpoint", checkpoint, "-o", out,
                   "--methods", "grad-attention", "--metrics", "deletion", "--steps", 2, "-j", 0, "--save-raw",
                   "--boxes", tmp_path / "boxes", "--masks", tmp_path / "masks")
    assert again.exit_code == 0 and "4 already complete" in said(again)  # resumes like the other lines


def test_coco_boxes_and_synset_labels(tmp_path):
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "dir/dog.jpg", "width": 64, "height": 48}],
        "annotations": [{"image_id": 7, "category_id": 3, "bbox": [10.0, 5.0, 20.0, 10.0]}],
        "categories": [{"id": 3, "name": "n02108422"}]}))
    boxes = GroundTruth(tmp_path / "coco.json").boxes_for("dog")
    assert boxes.size == (64, 48) and boxes.boxes == [Box("n02108422", 10.0, 5.0, 30.0, 15.0)]
    region = box_region(boxes.boxes, 48, 64)
    assert region.sum() == 20 * 10 and region[5, 10] and not region[15, 10]


@pytest.mark.parametrize("args, message", [
    (["--boxes", "missing"], "--boxes missing: does not exist"),
    (["--masks", "missing"], "--masks missing: does not exist"),
    (["--boxes", "bad.json"], "not COCO-style JSON"),
    (["--boxes", "empty"], "no .xml files"),
    (["--metrics", "pointing"], "--metrics pointing needs ground truth: --boxes or --masks"),
    (["--boxes", "boxes", "--metrics", "segmentation"], "--metrics segmentation needs object masks"),
])
def test_unusable_annotation_arguments_are_one_line_usage_errors(tmp_path, save_test_vit, args, message):
    _, checkpoint = save_test_vit()
    write_case(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"file_name": "x.png"}]}))
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / a) if a in ("missing", "bad.json", "empty", "boxes") else a for a in args]
    result = invoke("evaluate", tmp_path / "in", "--model", "test_vit", "--checkpoint", checkpoint,
                    "-o", tmp_path / "out", *args)
    assert result.exit_code == 2 and message.replace("missing", str(tmp_path / "missing")) in said(result)
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
