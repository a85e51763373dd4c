"""Cost of `evaluate --metrics deletion,insertion`: images/s against the ideal, bare inference, in one run.

    (e) `evaluate` end to end for --methods (default: one method, rollout), through prepare_evaluation and
        execute_evaluation as the command line runs it: decode, prediction, maps, every perturbed input,
        evaluation.jsonl written (the summary files are left out: they are written once per run)
    (i) the ideal: bare inference (fused attention, inference mode) over as many inputs as (e) perturbs, in
        chunks of --batch-size, the inputs built beforehand

(e) runs 2·(S+1) perturbed inputs per image for every row of its table: each method's, and the random
baseline's, which evaluate always adds. Printed: images/s of both (medians over --rounds rounds, the two
interleaved), the ratio e/i (target >= 0.8), and, for the record, e against the ideal of one row's
2·(S+1) inputs per image (the random row halves that for a one-method evaluation by construction).

Model: deit_tiny_patch16_224 with the real weights in ../shared when present (else random init, same cost).

    python benchmarks/evaluate.py [--images 16] [--steps 20] [--batch-size 32] [--methods rollout] [--rounds 3]
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

import torch  # noqa: E402
from throughput import image_folder  # noqa: E402  (the bundled photos copied to N files)

from vitexplain.models import build_model, plan_model  # noqa: E402
from vitexplain.run.allocator import keep_heap_memory  # noqa: E402
from vitexplain.run.evaluation import execute_evaluation, parse_methods, prepare_evaluation  # noqa: E402
from vitexplain.run.runtime import resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.pth"
MODEL = "deit_tiny_patch16_224"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", default="rollout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    keep_heap_memory()
    device = resolve_device(args.device)
    checkpoint = WEIGHTS if WEIGHTS.is_file() else None
    methods = parse_methods(args.methods)
    work = Path(tempfile.mkdtemp(prefix="vitexplain-bench-eval-"))
    try:
        folder = work / "images"
        folder.mkdir()
        image_folder(folder, args.images, None)
        plan = plan_model(MODEL, checkpoint=checkpoint, pretrained=False)
        model = build_model(plan).to(device)
        rows = len(methods) + 1  # and the random baseline
        inputs = args.images * rows * 2 * (args.steps + 1)
        chunk = torch.randn(args.batch_size, 3, *plan.preprocessing.size, device=device)

        def ideal() -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                for start in range(0, inputs, args.batch_size):
                    model(chunk[: min(args.batch_size, inputs - start)])
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started

        def evaluate(round_: int) -> float:
            job = prepare_evaluation([folder], work / f"out{round_}", methods, ("deletion", "insertion"), args.steps,
                                     model=MODEL, checkpoint=checkpoint, pretrained=False, device=str(device))
            started = time.perf_counter()
            summary = execute_evaluation(job, args.batch_size, num_workers=0)
            assert summary.images == args.images and not summary.failures
            return time.perf_counter() - started

        evaluate(-1)  # warm-up: numba kernels compiled (or loaded from cache), allocator primed
        ideal()
        seconds = {"evaluate": [], "ideal": []}
        for round_ in range(args.rounds):
            seconds["evaluate"].append(evaluate(round_))
            seconds["ideal"].append(ideal())
        evaluate_rate = args.images / statistics.median(seconds["evaluate"])
        ideal_rate = args.images / statistics.median(seconds["ideal"])
        per_round = [i / e for e, i in zip(seconds["evaluate"], seconds["ideal"])]
        print(f"{MODEL} ({'real weights' if checkpoint else 'random init'}) on {device}, {args.images} images, "
              f"--steps {args.steps}, --batch-size {args.batch_size}, methods {args.methods} + random: "
              f"{rows} rows × {2 * (args.steps + 1)} perturbed inputs per image")
        print(f"(e) evaluate            {evaluate_rate:8.2f} images/s")
        print(f"(i) ideal, same inputs  {ideal_rate:8.2f} images/s ({inputs} forward inputs)")
        print(f"e/i = {evaluate_rate / ideal_rate:.3f} (target >= 0.8); per round: median {statistics.median(per_round):.3f}, "
              f"range {min(per_round):.3f}–{max(per_round):.3f}")
        print(f"e against one row's 2·(S+1) inputs per image: {evaluate_rate / (ideal_rate * rows):.3f}× of "
              f"{ideal_rate * rows:.2f} images/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
