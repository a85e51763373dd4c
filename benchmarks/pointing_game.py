"""Grid pointing game (Böhle et al., B-cos): how well each class-specific method localises.

From four photos whose predicted classes differ, every 2×2 arrangement (24) is a grid at the model's input
size, each tile a whole photo at half the input size. For each tile, the method explains that tile's class
(the class the model predicts for the photo alone); the score is the share of the (non-negative) mask's
mass inside that tile. Chance is 0.25. Prints the mean over the 96 targets and its range per method setting.

Default photos: the four bundled examples/images; the model deit_tiny_patch16_224 with the real weights in
../shared (required: random weights localise nothing).

    python benchmarks/pointing_game.py [--photos a.jpg b.jpg c.jpg d.jpg] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitexplain import get_method, load_model, preprocessing_for
from vitexplain.io.inputs import load_image

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "deit_tiny_patch16_224.pth"
SETTINGS = [  # (method, parameters)
    ("grad-rollout", {"discard_ratio": 0.9}),
    ("grad-rollout", {"discard_ratio": 0.0}),
    ("grad-attention", {"layers": "1", "negatives": "fused"}),
    ("grad-attention", {"layers": "1", "negatives": "heads"}),
    ("grad-attention", {"layers": "2", "negatives": "fused"}),
    ("grad-attention", {"layers": "2", "negatives": "heads"}),
    ("grad-attention", {"layers": "all", "negatives": "fused"}),
    ("grad-attention", {"layers": "all", "negatives": "heads"}),
    ("chefer", {}),
    ("legrad", {"layers": "1"}),
    ("legrad", {"layers": "2"}),
    ("legrad", {"layers": "4"}),
    ("legrad", {"layers": "all"}),
]


def grids(photos: list[Image.Image], size: tuple[int, int]) -> tuple[list[Image.Image], list[tuple[int, ...]]]:
    """Every arrangement of the four photos as a 2×2 grid of ``size`` (H, W), and which photo is in which tile
    (tiles in row-major order)."""
    height, width = size
    tiles = [photo.resize((width // 2, height // 2), Image.Resampling.BICUBIC) for photo in photos]
    pictures, orders = [], []
    for order in itertools.permutations(range(4)):
        grid = Image.new("RGB", (width, height))
        for position, index in enumerate(order):
            grid.paste(tiles[index], ((position % 2) * (width // 2), (position // 2) * (height // 2)))
        pictures.append(grid)
        orders.append(order)
    return pictures, orders


def tile_shares(masks: torch.Tensor) -> torch.Tensor:
    """``(B, 4)`` share of each mask ``(B, gh, gw)`` in its tile, for masks whose k-th belongs to tile k."""
    batch, gh, gw = masks.shape
    mass = masks.clamp_min(0).reshape(batch, 2, gh // 2, 2, gw // 2).sum(dim=(2, 4)).reshape(batch, 4)
    return mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs=4, type=Path, default=sorted((ROOT / "examples" / "images").iterdir()))
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        raise SystemExit(f"needs the real weights at {WEIGHTS}")
    model = load_model("deit_tiny_patch16_224", checkpoint=WEIGHTS)
    prep = preprocessing_for(model)
    photos = [load_image(path) for path in args.photos]
    with torch.no_grad():
        classes = model(torch.stack([prep(photo) for photo in photos])).argmax(dim=-1).tolist()
    if len(set(classes)) < 4:
        raise SystemExit(f"the photos' predicted classes must differ, got {classes}")
    pictures, orders = grids(photos, prep.size)
    pixels = torch.stack([prep(np.asarray(picture)) for picture in pictures])
    targets = [torch.tensor([classes[order[position]] for order in orders]) for position in range(4)]
    print(f"{len(pictures)} grids × 4 tiles of {', '.join(p.name for p in args.photos)} (classes {classes}), "
          f"deit_tiny_patch16_224; chance 0.25")
    print(f"{'method':15s} {'settings':42s} share in the right tile")
    for method, params in SETTINGS:
        explainer = get_method(method)(model, **params)
        shares = []
        for first in range(0, len(pictures), args.batch_size):
            chunk = slice(first, first + args.batch_size)
            masks = explainer.explain(pixels[chunk], [t[chunk] for t in targets]).masks[:, :, 0]  # (B, 4, gh, gw)
            for position in range(4):
                shares += tile_shares(masks[:, position])[:, position].tolist()
        settings = ", ".join(f"{k}={v}" for k, v in explainer.settings.items())
        print(f"{method:15s} {settings:42s} {statistics.mean(shares):.3f} (range {min(shares):.2f}–{max(shares):.2f})")


if __name__ == "__main__":
    main()
