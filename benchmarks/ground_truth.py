"""Cost of the ground-truth metrics: `evaluate` with and without --boxes and --masks, in one run.

    (p) `evaluate --metrics deletion,insertion` over --images copies of the bundled photos, end to end through
        prepare_evaluation and execute_evaluation (decode, prediction, maps, perturbed inputs, lines written)
    (g) the same with --boxes (Pascal VOC, two boxes per image) and --masks (a PNG per image) at each image's
        own size: pointing, energy and segmentation added for every method × image

Printed: seconds of both (medians over --rounds rounds, interleaved) and g/p − 1, the share the ground-truth
metrics add (target < 5 %). Model: deit_tiny_patch16_224 with the real weights in ../shared when present.

    python benchmarks/ground_truth.py [--images 16] [--methods rollout,grad-attention] [--rounds 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from vitexplain.run.openmp import shorten_spin_wait

shorten_spin_wait()  # the CLI's OpenMP setting, before torch loads

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from throughput import image_folder  # noqa: E402  (the bundled photos copied to N files)

from vitexplain.io.inputs import find_images  # noqa: E402
from vitexplain.run.allocator import keep_heap_memory  # noqa: E402
from vitexplain.run.evaluation import execute_evaluation, parse_methods, prepare_evaluation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.pth"
MODEL = "deit_tiny_patch16_224"


def annotate(folder: Path, boxes: Path, masks: Path) -> None:
    """Two boxes per image, their labels cycling over the classes (which class a box names does not change the
    cost), and a centred object mask, at each image's own size."""
    boxes.mkdir()
    masks.mkdir()
    paths, _ = find_images([folder])
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            width, height = image.size
        objects = "".join(f"<object><name>{label}</name><bndbox><xmin>{1 + width // 8}</xmin><ymin>{1 + height // 8}</ymin>"
                          f"<xmax>{width // 2}</xmax><ymax>{height // 2}</ymax></bndbox></object>"
                          for label in (index % 1000, (index * 7) % 1000))
        (boxes / f"{path.stem}.xml").write_text(f"<annotation><size><width>{width}</width><height>{height}</height>"
                                                f"</size>{objects}</annotation>")
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
        Image.fromarray(mask).save(masks / f"{path.stem}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", default="rollout,grad-attention")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    keep_heap_memory()
    checkpoint = WEIGHTS if WEIGHTS.is_file() else None
    methods = parse_methods(args.methods)
    work = Path(tempfile.mkdtemp(prefix="vitexplain-bench-gt-"))
    try:
        folder = work / "images"
        folder.mkdir()
        image_folder(folder, args.images, None)
        annotate(folder, work / "boxes", work / "masks")

        def evaluate(name: str, **ground_truth) -> float:
            out = work / name
            job = prepare_evaluation([folder], out, methods, ("deletion", "insertion"), args.steps, model=MODEL,
                                     checkpoint=checkpoint, pretrained=False, **ground_truth)
            started = time.perf_counter()
            execute_evaluation(job, batch_size=args.batch_size, num_workers=0)
            seconds = time.perf_counter() - started
            shutil.rmtree(out)
            return seconds

        evaluate("warm")
        plain, with_truth = [], []
        for round_ in range(args.rounds):
            plain.append(evaluate(f"p{round_}"))
            with_truth.append(evaluate(f"g{round_}", boxes=work / "boxes", masks=work / "masks"))
        p, g = statistics.median(plain), statistics.median(with_truth)
        print(f"{args.images} images, {MODEL}, methods {args.methods} + random, {args.steps} steps, batch {args.batch_size}")
        print(f"  (p) deletion + insertion            {p:6.2f} s  (rounds {', '.join(f'{v:.2f}' for v in plain)})")
        print(f"  (g) + pointing, energy, segmentation {g:6.2f} s  (rounds {', '.join(f'{v:.2f}' for v in with_truth)})")
        ratios = sorted(b / a - 1 for a, b in zip(plain, with_truth))
        print(f"g/p - 1 = {g / p - 1:+.1%} (target < 5%); round by round {statistics.median(ratios):+.1%} "
              f"({ratios[0]:+.1%} to {ratios[-1]:+.1%})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
