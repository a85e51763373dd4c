"""Throughput: explanations vs plain inference over the same DataLoader, in one run.

    (a) plain timm inference (fused attention, inference mode)      (b) `rollout` end to end, overlays written
    (c) forward + backward (∂ top-1 logit / ∂ input, no weight grads) (d) `grad-rollout` end to end, overlays written
    and each further class-specific method of --methods end to end (default: grad-attention, chefer, legrad, lrp),
    against (c) (target: each >= 0.8).

Prints images/s for each (the median over --rounds rounds, the four runs interleaved in every round, so
that a noisy machine slows all of them alike) and the ratios b/a and d/c (targets on CPU, deit_tiny,
>= 256 images: b/a >= 0.80, d/c >= 0.8): of the medians, and round by round (the median and range of each
round's own ratio, whose two runs ran back to back). The process uses the CLI's heap and OpenMP settings (vitexplain.allocator,
vitexplain.openmp) for every run. Images: the bundled examples/images copied to --images files (optionally resized so their
longer side is --resize, up or down), read by the same DataLoader (--workers processes) in every run.

    python benchmarks/throughput.py [--images 256] [--batch-size 32] [--format png|jpg] [--resize 256] [--device auto] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from vitexplain.run.openmp import shorten_spin_wait

shorten_spin_wait()  # the CLI's OpenMP setting, before torch loads: every run below gets it

import torch  # noqa: E402
from PIL import Image

from vitexplain.io.inputs import find_images
from vitexplain.io.outputs import OutputWriter
from vitexplain.models import build_model, plan_model
from vitexplain.run.allocator import keep_heap_memory
from vitexplain.run.loader import make_loader
from vitexplain.run.options import RenderOptions
from vitexplain.run.pipeline import explain_paths
from vitexplain.run.request import Request
from vitexplain.run.runtime import default_workers, resolve_device

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.pth"


def image_folder(folder: Path, count: int, resize: int | None) -> list[Path]:
    examples, _ = find_images([ROOT / "examples" / "images"])
    for index in range(count):
        source = examples[index % len(examples)]
        target = folder / f"img{index:05d}{source.suffix}"
        if resize:  # e.g. --resize 4000: 12-megapixel photos, as from a phone camera
            with Image.open(source) as image:
                scale = resize / max(image.size)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
                image.resize(size, resample).save(target, quality=90)
        else:
            shutil.copy(source, target)
    return sorted(folder.iterdir())


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (the DataLoader workers of earlier
    runs): where every core is busy, b/a is about the inverse ratio of CPU time per image."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def plain_inference(model, loader, device) -> None:
    with torch.inference_mode():
        for batch in loader:
            model(batch.pixels.to(device, non_blocking=True))


def forward_backward(model, loader, device) -> None:
    for batch in loader:
        pixels = batch.pixels.to(device, non_blocking=True).requires_grad_()
        logits = model(pixels)
        torch.autograd.grad(logits.max(dim=-1).values.sum(), pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="default: as the CLI for the device")
    parser.add_argument("--format", default="png", choices=("png", "jpg"))
    parser.add_argument("--resize", type=int, default=None, help="longer side of the benchmark images, up- or downscaled")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="grad-attention,chefer,legrad,lrp",
                        help="further class-specific methods to run end to end against (c), comma-separated")
    args = parser.parse_args()
    keep_heap_memory()
    device = resolve_device(args.device)
    args.workers = default_workers(device) if args.workers is None else args.workers
    if args.model == "deit_tiny_patch16_224" and WEIGHTS.is_file():
        plan = plan_model(args.model, checkpoint=WEIGHTS)
    else:
        plan = plan_model(args.model, pretrained=False)
    model = build_model(plan).to(device)
    prep = plan.preprocessing
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "images").mkdir()
        paths = image_folder(Path(scratch) / "images", args.images, args.resize)

        def loader():
            return make_loader(paths, prep, args.batch_size, args.workers, device.type == "cuda")

        def explain(method: str) -> None:
            out = Path(scratch) / method
            request = Request.create(method, plan, render=RenderOptions(image_format=args.format), amp=args.amp)
            explain_paths(request, model, paths, OutputWriter(out), args.batch_size, args.workers, device,
                          warm=False)  # the warm-up round below compiles the kernels, as (a)–(c) have none
            shutil.rmtree(out)

        runs = {
            "a plain inference": lambda: plain_inference(model, loader(), device),
            "b rollout, end to end": lambda: explain("rollout"),
            "c forward + backward": lambda: forward_backward(model, loader(), device),
            "d grad-rollout, end to end": lambda: explain("grad-rollout"),
        }
        for method in filter(None, args.methods.split(",")):
            runs[f"{method}, end to end"] = lambda method=method: explain(method)
        warm = paths[: 2 * args.batch_size]
        paths, all_paths = warm, paths
        for run in runs.values():  # warm-up: threads, numba cache, allocator
            run()
        paths = all_paths
        measured: dict[str, list[float]] = {name: [] for name in runs}
        core_ms: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started, cpu_started = time.perf_counter(), cpu_seconds()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                measured[name].append(len(paths) / (time.perf_counter() - started))
                core_ms[name].append(1000 * (cpu_seconds() - cpu_started) / len(paths))
        rates = {name: statistics.median(values) for name, values in measured.items()}
    size = f"longer side {args.resize}" if args.resize else "bundled photos at full size (0.15-0.27 MP)"
    print(f"{len(paths)} images ({size}), {args.model}, batch {args.batch_size}, {args.workers} workers, "
          f"{device}, overlays as {args.format}{', amp' if args.amp else ''}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}")
    for name, rate in rates.items():
        spread = ", ".join(f"{value:.1f}" for value in measured[name])
        print(f"  {name:28s} {rate:7.1f} images/s  {statistics.median(core_ms[name]):5.1f} CPU ms/image  (median of {spread})")
    a, b, c, d, *others = rates.values()
    print(f"b/a = {b / a:.3f} (target >= 0.80)   d/c = {d / c:.3f} (target >= 0.8)")
    for name, rate in list(rates.items())[4:]:
        print(f"{name.split(',')[0]} / c = {rate / c:.3f} (target >= 0.8)")
    a, b, c, d, *others = measured.values()
    print(f"round by round (each pair run back to back, so drifts of the machine's speed cancel): "
          f"b/a {paired_ratios(b, a)}   d/c {paired_ratios(d, c)}"
          + "".join(f"   {name.split(',')[0]}/c {paired_ratios(values, c)}"
                    for name, values in list(measured.items())[4:]))


def paired_ratios(numerators: list[float], denominators: list[float]) -> str:
    """The median of the per-round ratios and their range, e.g. ``0.85 (0.81-0.88)``."""
    ratios = sorted(n / d for n, d in zip(numerators, denominators))
    return f"{statistics.median(ratios):.3f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


if __name__ == "__main__":
    main()
