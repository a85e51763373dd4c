"""The command line answers at once: ``vitexplain --help`` and ``vitexplain CMD --help`` vs ``import torch``.

Each is run as a fresh process, alternately, --repeats times (the median is kept); prints the seconds and
the ratio of each help to the import (target: below 0.25). The help commands load no torch, timm or numba.

    python benchmarks/cli_help.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "vitexplain --help": [sys.executable, "-m", "vitexplain", "--help"],
    "vitexplain rollout --help": [sys.executable, "-m", "vitexplain", "rollout", "--help"],
    "vitexplain sweep --help": [sys.executable, "-m", "vitexplain", "sweep", "--help"],
}


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for command in COMMANDS.values():  # warm the file cache
        seconds(command)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            times[name].append(seconds(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    torch_seconds = medians.pop("python -c 'import torch'")
    print(f"python -c 'import torch'   {torch_seconds:6.2f} s (median of {args.repeats})")
    for name, value in medians.items():
        print(f"{name:26s} {value:6.2f} s   ratio to import torch {value / torch_seconds:.3f} (target < 0.25)")


if __name__ == "__main__":
    main()
