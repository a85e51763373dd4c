"""Sweep cost: a 20-ratio sweep (GIF written) vs one rollout (PNG written) over the same images, in one run.

Both run end to end through the same pipeline (decode → model → method → render → write) on the bundled
examples/images (repeated to --images), deit_tiny_patch16_224 (real weights from ../shared when present,
else random init), CPU unless CUDA is present. Target: sweep / rollout <= 1.3.

    python benchmarks/sweep.py [--images 32] [--ratios 0:0.95:20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vitexplain.run.openmp import shorten_spin_wait

shorten_spin_wait()  # the CLI's OpenMP setting, before torch loads: every run below gets it

import torch  # noqa: E402

from vitexplain.io.inputs import find_images
from vitexplain.io.outputs import OutputWriter
from vitexplain.models import build_model, plan_model
from vitexplain.run.options import SweepOptions, parse_ratios
from vitexplain.run.pipeline import explain_paths
from vitexplain.run.request import Request
from vitexplain.run.runtime import resolve_device

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.pth"


def timed_run(plan, model, paths, device, sweep) -> float:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        request = Request.create("rollout", plan, sweep=sweep, fusion="mean", discard_ratio=0.9)
        explain_paths(request, model, paths, OutputWriter(Path(out)), batch_size=8, device=device)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--ratios", default="0:0.95:20")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the best is kept")
    args = parser.parse_args()
    torch.manual_seed(0)
    if WEIGHTS.is_file():
        plan = plan_model("deit_tiny_patch16_224", checkpoint=WEIGHTS)
    else:
        plan = plan_model("deit_tiny_patch16_224", pretrained=False)
    device = resolve_device("auto")
    model = build_model(plan).to(device)
    examples, _ = find_images([ROOT / "examples" / "images"])
    paths = [examples[i % len(examples)] for i in range(args.images)]
    sweep = SweepOptions(parse_ratios(args.ratios))
    timed_run(plan, model, paths[:8], device, None)  # warm-up
    single, swept = [], []
    for _ in range(args.repeats):
        single.append(timed_run(plan, model, paths, device, None))
        swept.append(timed_run(plan, model, paths, device, sweep))
    print(f"{args.images} images, deit_tiny, {device}, {len(sweep.ratios)} ratios ({args.ratios}), best of {args.repeats}")
    print(f"rollout (one ratio, PNG):      {min(single):7.2f} s  {args.images / min(single):6.1f} images/s")
    print(f"sweep ({len(sweep.ratios)} ratios, GIF):       {min(swept):7.2f} s  {args.images / min(swept):6.1f} images/s")
    print(f"ratio sweep / rollout: {min(swept) / min(single):.2f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
