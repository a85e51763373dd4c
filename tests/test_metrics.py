"""The faithfulness metrics as pure tensor functions: hand-computed cases, independent loops, known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from vitexplain.metrics.baselines import content_key, random_maps
from vitexplain.metrics.perturbation import (
    area_under_curve, baseline_inputs, gaussian_blur, patch_ranks, perturbation_curves, perturbed_inputs, step_counts,
)
from vitexplain.metrics.pointing import arrangements, check_grid, compose_grids, image_groups, tile_shares
from vitexplain.metrics.statistics import bootstrap_interval


def test_ranks_highest_first_ties_by_lower_index():
    maps = torch.tensor([[[0.5, 0.9], [0.5, 0.1]], [[0.0, 0.0], [0.0, 0.0]]])
    assert patch_ranks(maps).tolist() == [[1, 0, 2, 3], [0, 1, 2, 3]]


def test_ranks_of_many_ties_follow_the_index_order():
    maps = torch.zeros(1, 14, 14)
    maps[0, 13, 13] = maps[0, 0, 5] = 1.0
    ranks = patch_ranks(maps)[0].tolist()
    assert ranks[5] == 0 and ranks[195] == 1
    assert [p for p in sorted(range(196), key=lambda p: ranks[p])][2:] == [p for p in range(196) if p not in (5, 195)]


def test_step_counts_floor_k_p_over_s():
    assert step_counts(10, 4) == [0, 2, 5, 7, 10]
    assert step_counts(196, 20)[:4] == [0, 9, 19, 29] and step_counts(196, 20)[-1] == 196
    with pytest.raises(ValueError, match="at least 1"):
        step_counts(10, 0)


def test_trapezoid_area_by_hand():
    assert area_under_curve(torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx(0.5)
    assert area_under_curve(torch.tensor([[0.2, 0.6, 0.6, 1.0]])).tolist() == pytest.approx([(0.1 + 0.6 + 0.6 + 0.5) / 3])


def test_perturbed_inputs_replace_exactly_the_chosen_patches():
    pixels = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    baselines = -torch.ones_like(pixels)
    chosen = torch.tensor([[True, False, False, False, False, True], [False] * 6])  # grid 2×3, patches 2×2
    out = perturbed_inputs(pixels, baselines, chosen, (2, 3))
    expected = pixels.clone()
    expected[0, :, 0:2, 0:2] = -1
    expected[0, :, 2:4, 4:6] = -1
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="whole number"):
        perturbed_inputs(pixels, baselines, chosen, (3, 3))


def blur_by_loops(image: np.ndarray, sigma: float = 5.0, size: int = 11) -> np.ndarray:
    """An independent 2-D blur: the outer-product kernel applied pixel by pixel, border reflected."""
    offsets = np.arange(size) - (size - 1) / 2
    line = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = np.outer(line, line) / np.outer(line, line).sum()
    pad = size // 2
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = np.zeros_like(image)
    for y in range(image.shape[1]):
        for x in range(image.shape[2]):
            out[:, y, x] = (padded[:, y:y + size, x:x + size] * kernel).sum(axis=(1, 2))
    return out


def test_blur_equals_a_direct_two_dimensional_filter():
    image = torch.randn(1, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    expected = blur_by_loops(image[0].double().numpy())
    assert np.allclose(gaussian_blur(image)[0].numpy(), expected, atol=1e-5)
    constant = torch.full((1, 3, 12, 12), 0.7)
    assert torch.allclose(baseline_inputs(constant, "blur"), constant, atol=1e-6)  # a normalised kernel
    assert torch.equal(baseline_inputs(image, "mean"), torch.zeros_like(image))
    with pytest.raises(ValueError, match="mean or blur"):
        baseline_inputs(image, "noise")


class OnePatch(nn.Module):
    """Two classes whose logits depend on the mean of patch ``patch`` (of a 4×4 grid of 8×8 patches) only:
    class 0 has probability σ(5) when the patch is 1, σ(−5) when it is 0."""

    def __init__(self, patch: int):
        super().__init__()
        self.row, self.col = divmod(patch, 4)

    def forward(self, x):
        value = x[:, :, self.row * 8:(self.row + 1) * 8, self.col * 8:(self.col + 1) * 8].mean(dim=(1, 2, 3))
        return torch.stack([10 * value - 5, torch.zeros_like(value)], dim=1)


def curves_for(model, maps, steps=16, batch_size=5):
    count = maps.shape[0]
    pixels = torch.ones(1, 3, 32, 32)
    runs = torch.zeros(2 * count, dtype=torch.long)
    insertion = torch.tensor([False] * count + [True] * count)
    curves = perturbation_curves(model, pixels, baseline_inputs(pixels, "mean"), runs, torch.cat([maps, maps]),
                                 torch.zeros(2 * count, dtype=torch.long), insertion, steps, batch_size)
    areas = area_under_curve(curves)
    return areas[:count], areas[count:], curves


def test_known_answers_with_a_model_that_reads_one_patch():
    steps, patch = 16, 6
    model = OnePatch(patch)
    high, low = 1 / (1 + math.exp(-5)), 1 / (1 + math.exp(5))
    pointing = torch.zeros(4, 4)
    pointing.view(-1)[patch] = 1.0
    elsewhere = torch.ones(4, 4)
    elsewhere.view(-1)[patch] = 0.0
    maps = torch.stack([pointing, elsewhere, random_maps(["an image"], (4, 4), seed=0)[0]])
    deletion, insertion, curves = curves_for(model, maps, steps)
    # pointing at the patch: it goes first (16 patches, 16 steps: one a step)
    assert curves[0].tolist() == pytest.approx([high] + [low] * steps, rel=1e-5)
    assert deletion[0].item() == pytest.approx((high + low) / (2 * steps) + low * (steps - 1) / steps, rel=1e-5)
    assert insertion[0].item() == pytest.approx((low + high) / (2 * steps) + high * (steps - 1) / steps, rel=1e-5)
    assert deletion[0] < 0.04 and insertion[0] > 0.96
    # pointing elsewhere: the patch goes last (the ties among the others do not matter)
    assert deletion[1].item() == pytest.approx(insertion[0].item(), rel=1e-5)
    assert insertion[1].item() == pytest.approx(deletion[0].item(), rel=1e-5)
    # the random map lands between the two
    assert deletion[0] < deletion[2] < deletion[1] and insertion[1] < insertion[2] < insertion[0]


def test_curves_equal_a_loop_over_images_and_steps():
    """Several images and maps in one stream, odd chunks: each curve as a loop one input at a time gives it."""
    generator = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Flatten(), nn.Linear(4 * 16, 7)).eval()
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    baselines = gaussian_blur(pixels)
    images = torch.tensor([0, 2, 1, 2, 0])
    maps = torch.rand(5, 4, 4, generator=generator)
    targets = torch.tensor([3, 0, 6, 1, 2])
    insertion = torch.tensor([False, True, True, False, True])
    steps = 5
    curves = perturbation_curves(model, pixels, baselines, images, maps, targets, insertion, steps, batch_size=4)
    for j in range(5):
        values = maps[j].flatten().tolist()
        order = sorted(range(16), key=lambda p: (-values[p], p))
        for k in range(steps + 1):
            image = baselines[images[j]].clone() if insertion[j] else pixels[images[j]].clone()
            source = pixels[images[j]] if insertion[j] else baselines[images[j]]
            for p in order[: k * 16 // steps]:
                r, c = divmod(p, 4)
                image[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = source[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
            with torch.no_grad():
                expected = model(image[None]).softmax(dim=-1)[0, targets[j]].item()
            assert curves[j, k].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_image_groups_take_the_first_open_group_without_the_class():
    assert image_groups([1, 1, 2, 3, 4, 2, 5, 6]) == [(0, 2, 3, 4), (1, 5, 6, 7)]
    assert image_groups([1, 1, 1, 1, 2, 3]) == []  # no four different classes
    assert image_groups([5, 6, 7, 8, 9]) == [(0, 1, 2, 3)]


def test_arrangements_put_each_image_once_in_every_tile():
    layouts = arrangements((10, 11, 12, 13))
    assert layouts[0] == (10, 11, 12, 13) and layouts[1] == (11, 12, 13, 10)
    for tile in range(4):
        assert sorted(layout[tile] for layout in layouts) == [10, 11, 12, 13]


def test_compose_grids_places_each_downscaled_tile():
    pixels = torch.randn(4, 3, 8, 12, generator=torch.Generator().manual_seed(2))
    grids = compose_grids(pixels, torch.tensor([[2, 0, 3, 1]]))
    small = torch.nn.functional.interpolate(pixels, size=(4, 6), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(grids[0, :, :4, :6], small[2]) and torch.equal(grids[0, :, :4, 6:], small[0])
    assert torch.equal(grids[0, :, 4:, :6], small[3]) and torch.equal(grids[0, :, 4:, 6:], small[1])
    with pytest.raises(ValueError, match="even patch grid"):
        check_grid((7, 7))


def test_tile_shares_by_hand():
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, 0], mask[0, 1, 3], mask[0, 3, 3] = 3.0, 1.0, -5.0  # negative mass is left out
    assert tile_shares(mask).tolist() == [[0.75, 0.25, 0.0, 0.0]]
    assert tile_shares(torch.zeros(1, 4, 4)).tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_random_maps_depend_on_the_key_and_seed_only():
    image = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert content_key(image) == content_key(image.clone()) != content_key(image + 1e-6)
    first = random_maps(["a", "b"], (3, 5), seed=0)
    assert torch.equal(random_maps(["b"], (3, 5), seed=0)[0], first[1])  # whatever else is in the batch
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(random_maps(["a"], (3, 5), seed=1)[0], first[0])
    assert first.min() >= 0 and first.max() < 1


def test_bootstrap_interval_of_a_constant_and_of_a_normal_sample():
    assert bootstrap_interval([0.3] * 7) == pytest.approx((0.3, 0.3))
    values = np.random.default_rng(3).normal(1.0, 2.0, 400)
    low, high = bootstrap_interval(values)
    half = 1.96 * values.std() / math.sqrt(values.size)  # the normal approximation the bootstrap should match
    assert low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.1 * half)
    assert bootstrap_interval(values) == bootstrap_interval(values)  # seeded


# ---- the grid game's rank-based readings ----

def readings_reference(mask: np.ndarray, tile: int) -> tuple[float, float, float]:
    """share, hit, AUROC of one map by loops over patches and pairs."""
    gh, gw = mask.shape
    tile_of = lambda r, c: (r >= gh // 2) * 2 + (c >= gw // 2)  # noqa: E731
    cells = [(r, c) for r in range(gh) for c in range(gw)]
    positive = sum(max(mask[r, c], 0) for r, c in cells)
    share = sum(max(mask[r, c], 0) for r, c in cells if tile_of(r, c) == tile) / positive if positive > 0 else 0.0
    best = max(range(len(cells)), key=lambda i: (mask[cells[i]], -i))  # the highest, ties to the lowest index
    hit = float(tile_of(*cells[best]) == tile)
    inside = [mask[r, c] for r, c in cells if tile_of(r, c) == tile]
    outside = [mask[r, c] for r, c in cells if tile_of(r, c) != tile]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in inside for b in outside]
    return share, hit, sum(pairs) / len(pairs)


def test_tile_readings_known_answers():
    from vitexplain.metrics.pointing import tile_readings

    indicator = torch.zeros(4, 6, 6)
    indicator[:, 3:, :3] = 1  # tile 2, bottom left
    maps = torch.stack([indicator[0], -indicator[0], torch.zeros(6, 6), indicator[0] * 0.5 + 0.1])
    readings = tile_readings(maps, torch.tensor([2, 2, 2, 2]))
    assert readings["share"].tolist()[:3] == [1.0, 0.0, 0.0]
    assert readings["hit"].tolist()[:3] == [1.0, 0.0, 0.0]  # a constant map: the lowest index, tile 0
    assert readings["tile_auroc"].tolist()[:3] == [1.0, 0.0, 0.5]
    assert readings["hit"][3] == 1 and readings["tile_auroc"][3] == 1 and readings["share"][3] == pytest.approx(
        9 * 0.6 / (9 * 0.6 + 27 * 0.1))


def test_a_sharpened_map_keeps_hit_and_auroc_exactly_and_raises_share():
    from vitexplain.metrics.pointing import tile_readings

    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(32, 10, 10, generator=generator, dtype=torch.float64)
    tiles = torch.randint(0, 4, (32,), generator=generator)
    maps[torch.arange(32), tiles.div(2, rounding_mode="floor") * 5, (tiles % 2) * 5] += 0.3  # a bright patch in the tile
    plain, squared = tile_readings(maps, tiles), tile_readings(maps ** 2, tiles)
    assert torch.equal(plain["hit"], squared["hit"]) and torch.equal(plain["tile_auroc"], squared["tile_auroc"])
    assert squared["share"].mean() > plain["share"].mean()


def test_tile_readings_equal_loops_over_patches_and_pairs():
    from vitexplain.metrics.pointing import tile_readings

    generator = torch.Generator().manual_seed(4)
    maps = torch.randint(-2, 4, (40, 6, 8), generator=generator).double()  # many ties and negatives
    tiles = torch.randint(0, 4, (40,), generator=generator)
    readings = tile_readings(maps, tiles)
    for index in range(40):
        share, hit, auroc = readings_reference(maps[index].numpy(), int(tiles[index]))
        assert float(readings["share"][index]) == pytest.approx(share, abs=1e-6)
        assert float(readings["hit"][index]) == hit
        assert float(readings["tile_auroc"][index]) == pytest.approx(auroc, abs=1e-6)


# ---- Chefer et al.'s positive / negative perturbation ----

TRAPZ = getattr(np, "trapezoid", None) or np.trapz  # their code's np.trapz (renamed in numpy 2)

def test_fraction_counts_are_int_p_times_f():
    from vitexplain.metrics.perturbation import fraction_counts

    assert fraction_counts(196) == [0, 19, 39, 58, 78, 98, 117, 137, 156, 176]
    assert fraction_counts(16) == [0, 1, 3, 4, 6, 8, 9, 11, 12, 14]


def chefer_curves(model, maps, negative: bool):
    from vitexplain.metrics.perturbation import chefer_area, fraction_counts

    count = maps.shape[0]
    pixels = torch.ones(1, 3, 32, 32)
    curves = perturbation_curves(model, pixels, baseline_inputs(pixels, "mean"), torch.zeros(count, dtype=torch.long),
                                 -maps if negative else maps, torch.zeros(count, dtype=torch.long),
                                 torch.zeros(count, dtype=torch.bool), 20, 3, counts=fraction_counts(16), top1=True)
    return curves, chefer_area(curves)


def test_chefer_known_answers_with_a_model_that_reads_one_patch():
    patch = 6
    model = OnePatch(patch)  # top-1 is class 0 while the patch is there, class 1 once it is removed
    pointing = torch.zeros(4, 4)
    pointing.view(-1)[patch] = 1.0
    # positive: the patch goes first; removed from f = 0.1 on (int(16·0.1) = 1): accuracy 1, 0, 0, … → 100·0.1/2
    curves, areas = chefer_curves(model, pointing[None], negative=False)
    assert curves[0].tolist() == [1.0] + [0.0] * 9 and areas[0].item() == pytest.approx(5.0)
    # negative: the patch goes last; int(16·0.9) = 14 < 16 patches are removed at most: always right → 100·0.9
    curves, areas = chefer_curves(model, pointing[None], negative=True)
    assert curves[0].tolist() == [1.0] * 10 and areas[0].item() == pytest.approx(90.0)
    # a map pointing away from it: positive removes it last (never), negative first
    _, areas = chefer_curves(model, 1 - pointing[None], negative=False)
    assert areas[0].item() == pytest.approx(90.0)
    _, areas = chefer_curves(model, 1 - pointing[None], negative=True)
    assert areas[0].item() == pytest.approx(5.0)


def test_chefer_curves_equal_a_loop_as_their_code_computes_it():
    """Top and bottom int(P·f) patches by torch.topk of the map (or of its negation), top-1 compared with the
    target, np.trapz over the fractions × 100."""
    from vitexplain.metrics.perturbation import CHEFER_FRACTIONS, chefer_area, fraction_counts

    generator = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 8, stride=8), nn.Flatten(), nn.Linear(4 * 16, 3)).eval()
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    images = torch.tensor([0, 1, 2, 0, 2, 1])
    maps = torch.rand(6, 4, 4, generator=generator)
    with torch.no_grad():
        targets = model(pixels[images]).argmax(dim=-1)
    for negative in (False, True):
        curves = perturbation_curves(model, pixels, torch.zeros_like(pixels), images, -maps if negative else maps,
                                     targets, torch.zeros(6, dtype=torch.bool), 20, 4, counts=fraction_counts(16),
                                     top1=True)
        for j in range(6):
            accuracy = []
            for fraction in CHEFER_FRACTIONS:
                image = pixels[images[j]].clone()
                vis = -maps[j].flatten() if negative else maps[j].flatten()
                for p in torch.topk(vis, int(16 * fraction)).indices.tolist():  # no ties in rand maps
                    r, c = divmod(p, 4)
                    image[:, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 0
                with torch.no_grad():
                    accuracy.append(float(model(image[None]).argmax(dim=-1).item() == targets[j].item()))
            assert curves[j].tolist() == accuracy
            assert chefer_area(curves[j]).item() == pytest.approx(TRAPZ(accuracy, CHEFER_FRACTIONS) * 100, rel=1e-6)
