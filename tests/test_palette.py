"""GIF colour quantisation: the median cut's cuts, the palette mapping, and its error against Pillow's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitexplain.io.inputs import load_rgb
from vitexplain.io.codecs.palette import (CELLS, FAR, LEVELS, UNSET, best_cut, cell_histogram, level_histograms, median_cut,
                                nearest, palette_indices, quantize, sample_step, SAMPLE_SIZE)
from vitexplain.render.sweep import sweep_frames

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
RNG = np.random.default_rng(0)


def test_colours_in_separate_cells_come_back_exactly():
    levels = np.array([0, 85, 170, 255], dtype=np.uint8)  # 64 colours, each in its own 5-bit cell
    colours = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    frames = colours[RNG.integers(0, 64, (3, 40, 50))]
    palette, indices = quantize(frames)
    assert len(palette) == 64
    np.testing.assert_array_equal(palette[indices].reshape(frames.shape), frames)


def test_palette_size_is_bounded_and_every_index_is_in_it():
    frames = RNG.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    for colours in (1, 7, 256):
        palette, indices = quantize(frames, colours)
        assert len(palette) == colours and indices.max() < colours and indices.shape == (2, 64 * 64)


def squared_error(points, weights):
    mean = (points * weights[:, None]).sum(0) / weights.sum()
    return (weights * ((points - mean) ** 2).sum(1)).sum()


@pytest.mark.parametrize("seed", range(5))
def test_best_cut_lowers_the_squared_error_the_most(seed):
    """Against every (axis, level) cut by brute force, cells standing for their mean colour."""
    rng = np.random.default_rng(seed)
    coords = rng.integers(0, LEVELS, (40, 3))
    weights = rng.integers(1, 50, 40).astype(np.float64)
    means = coords * 8 + rng.uniform(0, 7, (40, 3))
    order = np.arange(40)
    level_weights, level_sums = np.empty((3, LEVELS)), np.empty((3, LEVELS, 3))
    level_histograms(order, 0, 40, coords, weights, means * weights[:, None], level_weights, level_sums)
    gain, axis, level = best_cut(level_weights, level_sums)
    whole, gains = squared_error(means, weights), {}
    for a in range(3):
        for cut in range(1, LEVELS):
            left = coords[:, a] < cut
            if left.any() and not left.all():
                gains[a, cut] = whole - squared_error(means[left], weights[left]) - squared_error(means[~left], weights[~left])
    assert gain == pytest.approx(max(gains.values()), rel=1e-9)
    assert gains[axis, level] == pytest.approx(gain, rel=1e-9)


def test_one_cell_cannot_be_cut():
    level_weights, level_sums = np.zeros((3, LEVELS)), np.zeros((3, LEVELS, 3))
    level_weights[:, 5], level_sums[:, 5] = 3.0, 120.0
    assert best_cut(level_weights, level_sums) == (0.0, -1, 0)


def test_nearest_is_the_closest_colour_and_the_lower_index_on_ties():
    palette = RNG.integers(0, 256, (200, 3)).astype(np.uint8)
    palette[150] = palette[20]  # a duplicate: index 20 must win
    channels, keys = palette.T.astype(np.int32).copy(), np.empty(200, np.int32)
    for colour in [*RNG.integers(0, 256, (300, 3)), palette[20].astype(np.int64)]:
        distances = ((palette.astype(np.int64) - colour) ** 2).sum(1)
        assert nearest(channels, *colour, keys) == np.argmin(distances)


def test_cells_outside_the_table_take_the_colour_nearest_to_their_centre():
    palette = np.array([[0, 0, 0], [255, 255, 255], [200, 30, 30]], dtype=np.uint8)
    pixels = RNG.integers(0, 256, (500, 3), dtype=np.uint8)
    table = np.full(CELLS, UNSET, dtype=np.uint16)
    indices = palette_indices(pixels, palette, table)
    centres = (pixels // 8) * 8 + 4.0  # 8·level + 4 per channel
    expected = np.argmin(((centres[:, None, :] - palette[None].astype(float)) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(indices, expected)
    assert (table != UNSET).sum() == len(np.unique(pixels // 8, axis=0))  # each new cell looked up once, then kept


def sweep_of(name: str) -> np.ndarray:
    masks = np.clip(RNG.normal(0.5, 0.3, (20, 14, 14)), 0, 1).astype(np.float32)
    return sweep_frames(load_rgb(EXAMPLES / name), masks, np.linspace(0, 0.95, 20), "jet", 0.5, False, 256)


def test_sampled_cells_map_to_their_box_colour_within_far_or_else_to_the_nearest():
    frames = sweep_of("chelsea.png")
    histogram = cell_histogram(frames, sample_step(frames.shape))
    palette, table = median_cut(histogram, 256)
    cells = np.nonzero(histogram[:, 0])[0]
    assert (table[cells] != UNSET).all() and (np.delete(table, cells) == UNSET).all()
    means = np.floor(histogram[cells, 1:] / histogram[cells, :1] + 0.5)
    distances = ((means[:, None, :] - palette[None].astype(float)) ** 2).sum(-1)
    mapped = distances[np.arange(len(cells)), table[cells]]
    assert ((mapped <= FAR ** 2) | (mapped == distances.min(axis=1))).all()


@pytest.mark.parametrize("name", ["astronaut.jpg", "chelsea.png", "coffee.jpg", "rocket.jpg"])
def test_sweep_frames_lose_less_than_with_pillows_fast_octree(name):
    """Root-mean-square error over all pixels of a 20-frame sweep of a bundled photo, against the fast
    octree palette (from a similar sample) with Pillow's nearest-colour mapping, which this replaced."""
    frames = sweep_of(name)
    palette, indices = quantize(frames)
    ours = np.sqrt(((palette[indices].reshape(frames.shape).astype(float) - frames) ** 2).mean())
    stacked = Image.fromarray(frames.reshape(-1, *frames.shape[2:]))
    sample = Image.fromarray(np.ascontiguousarray(frames[::5, ::2, ::2]).reshape(-1, *frames.shape[2:]))
    octree = sample.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    pillow = np.asarray(stacked.quantize(palette=octree, dither=Image.Dither.NONE).convert("RGB"))
    theirs = np.sqrt(((pillow.reshape(frames.shape).astype(float) - frames) ** 2).mean())
    assert ours < theirs


@pytest.mark.parametrize("shape", [(20, 256, 171), (20, 64, 64), (1, 1, 1), (2, 300, 300), (8, 300, 300),
                                   (24, 300, 300), (100, 512, 512)])
def test_sample_step_samples_at_least_the_sample_size_with_the_largest_step_up_to_4(shape):
    def sampled(step):
        return shape[0] * -(-shape[1] // step) * -(-shape[2] // step)
    step = sample_step(shape)
    assert 1 <= step <= 4 and sampled(step) >= min(SAMPLE_SIZE, sampled(1))
    assert step == 4 or step == 1 and sampled(1) < 2 * SAMPLE_SIZE or sampled(step + 1) < SAMPLE_SIZE


@pytest.mark.parametrize("frames, colours, message", [
    (np.zeros((2, 4, 4), np.uint8), 256, "expected"),
    (np.zeros((2, 4, 4, 3), np.float32), 256, "expected"),
    (np.zeros((0, 4, 4, 3), np.uint8), 256, "expected"),
    (np.zeros((1, 4, 4, 3), np.uint8), 257, "1 to 256"),
    (np.zeros((1, 4, 4, 3), np.uint8), 0, "1 to 256"),
])
def test_bad_input_is_refused(frames, colours, message):
    with pytest.raises(ValueError, match=message):
        quantize(frames, colours)
