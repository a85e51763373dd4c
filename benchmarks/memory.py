"""Peak memory (RSS) of a `rollout` run over 200 vs 2,000 images: flat memory however large the folder.

Each run is a fresh process (`python -m vitexplain rollout ...`, overlays as JPEG); its peak RSS, and the
largest of its DataLoader workers', are read with getrusage in a small driver process. Prints both and
their ratio (target: 2,000-image peak no more than 10% above the 200-image peak).

    python benchmarks/memory.py [--small 200] [--large 2000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.pth"
DRIVER = """
import json, resource, sys
from vitexplain.run.runtime import configure_process
configure_process()  # as the console script does
from vitexplain.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"main_kib": own, "worker_kib": workers}), file=sys.stderr)
"""


def folder_of(count: int, folder: Path) -> Path:
    examples = sorted((ROOT / "examples" / "images").iterdir())
    folder.mkdir()
    for index in range(count):
        source = examples[index % len(examples)]
        (folder / f"img{index:05d}{source.suffix}").symlink_to(source)
    return folder


def peak_rss(count: int, scratch: Path) -> dict:
    images = folder_of(count, scratch / f"in{count}")
    model = ["--checkpoint", str(WEIGHTS)] if WEIGHTS.is_file() else []
    command = [sys.executable, "-c", DRIVER, "rollout", str(images), "-o", str(scratch / f"out{count}"),
               "--format", "jpg", "-b", "16", *model]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    return json.loads(result.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        small = peak_rss(args.small, Path(scratch))
        large = peak_rss(args.large, Path(scratch))
    for count, peaks in ((args.small, small), (args.large, large)):
        print(f"{count:6d} images: peak RSS main {peaks['main_kib'] / 1024:7.1f} MiB, "
              f"largest worker {peaks['worker_kib'] / 1024:7.1f} MiB")
    ratio = large["main_kib"] / small["main_kib"]
    print(f"main-process peak, {args.large} vs {args.small} images: {ratio:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
