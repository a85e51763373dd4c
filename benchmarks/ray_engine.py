"""The Ray engine's cost: images/s of `rollout --engine ray` with 1 and 2 actors against the local pipeline.

    (l) the local pipeline (`execute`, DataLoader workers as the command line picks them)
    (r1) `--engine ray --ray-workers 1`, (r2) `--ray-workers 2`, on a local Ray instance started once beforehand
         (ray.init(num_cpus=--cpus)); each run's time includes starting its actors and loading the model in
         each, as a user's run does, and folding the manifest parts at the end

Same folder (the bundled photos copied to --images files), same request, a fresh --out per run; the median of
--rounds rounds, the runs interleaved. Prints images/s and r1/l, r2/l.

    python benchmarks/ray_engine.py [--images 128] [--batch-size 16] [--cpus 2] [--rounds 2]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from vitexplain.run.openmp import shorten_spin_wait

shorten_spin_wait()

import ray  # noqa: E402
from throughput import image_folder  # noqa: E402  (the bundled photos copied to N files)

from vitexplain.run.job import execute, prepare  # noqa: E402
from vitexplain.run.ray_engine import run_on_ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.pth"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        raise SystemExit(f"needs a checkpoint every worker can load: {WEIGHTS}")
    work = Path(tempfile.mkdtemp(prefix="vitexplain-bench-ray-"))
    try:
        folder = work / "images"
        folder.mkdir()
        image_folder(folder, args.images, None)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        runs = 0

        def timed(engine: str, workers: int = 0) -> float:
            nonlocal runs
            runs += 1
            job = prepare("rollout", [folder], work / f"out{runs}", checkpoint=WEIGHTS, batch_size=args.batch_size,
                          part="ray-driver" if engine == "ray" else None)
            started = time.perf_counter()
            if engine == "ray":
                summary = run_on_ray(job, workers=workers, cpus_per_worker=args.cpus / workers)
            else:
                summary = execute(job)
            assert summary.outputs == args.images, summary
            return time.perf_counter() - started

        timed("local")  # warm-up: kernels compiled or loaded from numba's cache
        seconds = {"local": [], "ray1": [], "ray2": []}
        for _ in range(args.rounds):
            seconds["local"].append(timed("local"))
            seconds["ray1"].append(timed("ray", 1))
            seconds["ray2"].append(timed("ray", 2))
        rate = {name: args.images / statistics.median(values) for name, values in seconds.items()}
        print(f"rollout, deit_tiny_patch16_224, {args.images} images, batch {args.batch_size}, "
              f"local Ray with {args.cpus} CPUs (each actor --cpus-per-worker {args.cpus}/actors)")
        print(f"(l)  local pipeline     {rate['local']:7.1f} images/s")
        print(f"(r1) Ray, 1 actor       {rate['ray1']:7.1f} images/s   r1/l = {rate['ray1'] / rate['local']:.3f}")
        print(f"(r2) Ray, 2 actors      {rate['ray2']:7.1f} images/s   r2/l = {rate['ray2'] / rate['local']:.3f}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
