"""Attention Flow speed: the default exact solver (dinic) vs the networkx reference, in one run.

Graph: deit_tiny_patch16_224 (197 tokens × 12 layers, 196 input patches) on ../shared/images/both.png with the
real weights in ../shared when present, else a random-init model on a random image.
networkx is far too slow to run on all 196 patches: it is timed on --nx-sinks of them plus one graph
build, and extrapolated to 196 (build + 196 × mean time per flow). dinic is timed on all 196 flows,
graph build included, after one warm-up call (numba compiles on first use, then caches).

    python benchmarks/flow.py [--nx-sinks 4] [--ratios 0.9,0.0]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from vitexplain import capture_attention, load_model, preprocessing_for
from vitexplain.io.inputs import load_rgb
from vitexplain.io.preprocess import to_model_input
from vitexplain.methods.rollout_steps import fuse_layers, transition_matrices
from vitexplain.methods.flow import DinicFlow, NetworkxFlow

SHARED = Path(__file__).resolve().parents[2] / "shared"


def deit_attention():
    weights = SHARED / "weights" / "deit_tiny_patch16_224.pth"
    if weights.is_file():
        model = load_model("deit_tiny_patch16_224", checkpoint=weights)
        image = to_model_input(load_rgb(SHARED / "images" / "both.png"), preprocessing_for(model))[None]
        source = "real weights, both.png"
    else:
        torch.manual_seed(0)
        model = load_model("deit_tiny_patch16_224", pretrained=False)
        image = torch.randn(1, 3, 224, 224)
        source = "random init (../shared not found)"
    return capture_attention(model, image), source


def seconds(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nx-sinks", type=int, default=4, help="patches networkx is timed on")
    parser.add_argument("--ratios", default="0.9,0.0", help="discard ratios to measure (0.9 is the default)")
    args = parser.parse_args()
    capture, source = deit_attention()
    fused = fuse_layers(capture.attentions, "mean")
    readout = capture.readout[0].double().numpy()
    sinks = list(range(1, 197))
    print(f"graph: 197 tokens x 12 layers, 196 flows per image ({source})")
    for ratio in (float(r) for r in args.ratios.split(",")):
        transitions = torch.stack([t[0].double() for t in transition_matrices(fused, ratio, capture.layout)]).numpy()
        edges = int((transitions[1:] > 0).sum() + 197)
        DinicFlow(transitions, readout)(sinks[:2])  # compile / load the numba cache
        dinic_s, values = seconds(lambda: DinicFlow(transitions, readout)(sinks))
        build_s, reference = seconds(NetworkxFlow, transitions, readout)
        sample = sinks[:: len(sinks) // args.nx_sinks][: args.nx_sinks]
        solve_s, nx_values = seconds(reference, sample)
        networkx_s = build_s + solve_s / len(sample) * len(sinks)
        error = float(np.abs(values[np.array(sample) - 1] - nx_values).max())
        print(f"discard {ratio:g} ({edges} edges): networkx {networkx_s:8.2f} s/image (extrapolated from "
              f"{len(sample)} flows + build {build_s:.2f} s) | dinic {dinic_s:.4f} s/image | "
              f"ratio {networkx_s / dinic_s:7.0f}x | max |dinic - networkx| {error:.1e}")


if __name__ == "__main__":
    main()
