"""Colormaps, overlays, image discovery and preprocessing."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image
from vitexplain.io.preprocess import DOWNSCALE_GAP, to_model_input
from vitexplain.io.inputs import Failure, find_images
from vitexplain.models import Preprocessing
from vitexplain.render.colormaps import COLORMAPS, colormap_table
from vitexplain.render.overlay import fit_within, overlay, overlays, upsample_masks
from vitexplain.io.outputs import encoded_image


@pytest.mark.parametrize("name", COLORMAPS)
def test_colormap_tables_run_from_first_to_last_anchor(name):
    table = colormap_table(name)
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert len({tuple(c) for c in table}) > 100  # a ramp, not a few flat bands


def test_jet_and_gray_endpoints():
    assert colormap_table("gray")[0].tolist() == [0, 0, 0] and colormap_table("gray")[-1].tolist() == [255, 255, 255]
    assert colormap_table("jet")[0].tolist() == [0, 0, 127] and colormap_table("jet")[-1].tolist() == [127, 0, 0]


def test_overlay_blends_at_image_size():
    image = np.full((30, 50, 3), 100, dtype=np.uint8)
    mask = np.array([[0.0, 1.0]])
    assert np.array_equal(overlay(image, mask, "gray", alpha=0.0), image)
    heat = overlay(image, mask, "gray", alpha=1.0)
    assert heat.shape == (30, 50, 3)
    assert heat[:, 0].max() == 0 and heat[:, -1].min() == 255  # left patch 0 → black, right patch 1 → white
    half = overlay(image, np.ones((2, 2)), "gray", alpha=0.5)
    assert np.all(half == 178)  # (128·100 + 128·255) / 256 = 177.5, rounded
    assert np.all(overlay(image, np.zeros((2, 2)), "gray", alpha=0.3) == 70)  # alpha 77/256: 179·100/256 = 69.9
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, mask, alpha=1.5)


def test_stretch_maps_min_to_first_colour_and_max_to_last():
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    mask = np.array([[0.8, 1.0]])
    stretched = overlay(image, mask, "gray", alpha=1.0, stretch=True)
    assert stretched[:, 0].max() == 0 and stretched[:, -1].min() == 255
    plain = overlay(image, mask, "gray", alpha=1.0)
    assert plain[:, 0].min() == round(0.8 * 255)
    flat = overlay(image, np.full((2, 2), 0.7), "gray", alpha=1.0, stretch=True)
    assert flat.max() == 0


def test_upsample_keeps_values_in_unit_range():
    up = upsample_masks(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), (7, 9))
    assert up.shape == (1, 7, 9) and up.min() >= 0 and up.max() <= 1


@pytest.mark.parametrize("grid, size", [((14, 14), (300, 451)), ((6, 4), (7, 9)), ((3, 5), (3, 5)), ((5, 5), (2, 3))])
def test_upsampling_is_torch_bilinear_without_corner_alignment(grid, size):
    masks = torch.rand(3, *grid, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.interpolate(masks[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(upsample_masks(masks, size), expected.numpy(), rtol=0, atol=2e-6)


def test_overlays_of_several_masks_equal_one_overlay_each():
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    masks = np.random.default_rng(1).random((5, 4, 3)).astype(np.float32)
    frames = overlays(image, masks, "viridis", 0.4, stretch=True)
    assert frames.shape == (5, 40, 30, 3) and frames.dtype == np.uint8
    for frame, mask in zip(frames, masks):
        np.testing.assert_array_equal(frame, overlay(image, mask, "viridis", 0.4, stretch=True))
    stretched = np.stack([(m - m.min()) / (m.max() - m.min()) for m in masks])
    level = (upsample_masks(stretched, (40, 30)) * np.float32(255) + np.float32(0.5)).astype(int)  # colour index, then a rounded blend
    table = colormap_table("viridis").astype(int)
    weight = round(0.4 * 256)
    expected = (image.astype(int) * (256 - weight) + table[level] * weight + 128) >> 8
    np.testing.assert_array_equal(frames, expected)


def test_find_images_recurses_filters_and_deduplicates(tmp_path):
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "a" / "c.JPG")
    (tmp_path / "a" / "readme.txt").write_text("x")
    found, failures = find_images([tmp_path, tmp_path / "b.png"])
    assert found == [tmp_path / "a" / "c.JPG", tmp_path / "b.png"] and failures == []
    assert find_images([tmp_path / "nope"]) == ([], [Failure(tmp_path / "nope", "does not exist")])


def test_model_input_is_whole_image_resized_and_normalised():
    prep = Preprocessing(size=(4, 6), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    x = to_model_input(rgb, prep)
    assert x.shape == (3, 4, 6)
    torch.testing.assert_close(x[0], torch.full((4, 6), 2.0))  # (1 - .5) / .25
    torch.testing.assert_close(x[1], torch.full((4, 6), -1.0))  # (0 - .5) / .5
    torch.testing.assert_close(x[2], torch.full((4, 6), -0.5))


def smooth_photo(height: int, width: int) -> np.ndarray:
    """A deterministic RGB picture with detail at every scale (gradients plus a fine checker)."""
    y, x = np.mgrid[0:height, 0:width]
    checker = ((y // 3 + x // 3) % 2) * 40
    return np.stack([x * 200 // width + checker, y * 200 // height + checker, (x + y) % 256], axis=-1).astype(np.uint8)


def direct_resize(rgb: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The reference: one bicubic resize of the full image, no reduction step."""
    return np.asarray(Image.fromarray(rgb).resize(prep.size[::-1], Image.Resampling.BICUBIC), dtype=np.float32)


def pixel_levels(x: torch.Tensor, prep: Preprocessing) -> np.ndarray:
    """Undo the normalisation: ``(3, H, W)`` model input → ``(H, W, 3)`` levels in [0, 255]."""
    mean, std = torch.tensor(prep.mean).view(3, 1, 1), torch.tensor(prep.std).view(3, 1, 1)
    return ((x * std + mean) * 255).permute(1, 2, 0).numpy()


def test_model_input_resizes_directly_up_to_six_times_the_input_size():
    prep = Preprocessing(size=(16, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    limit = int(2 * DOWNSCALE_GAP)
    rgb = smooth_photo(16 * limit - 1, 24 * limit - 1)  # just under 2·gap× per axis: no reduction step
    np.testing.assert_allclose(pixel_levels(to_model_input(rgb, prep), prep), direct_resize(rgb, prep), atol=1e-3)
    # a Pillow image in gives exactly what its pixels as an array give
    assert torch.equal(to_model_input(Image.fromarray(rgb), prep), to_model_input(rgb, prep))


def test_model_input_of_a_large_image_stays_close_to_a_direct_resize():
    prep = Preprocessing(size=(16, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    rgb = smooth_photo(16 * 20, 24 * 20)  # 20× the input: box-reduced by 6, then bicubic
    difference = np.abs(pixel_levels(to_model_input(rgb, prep), prep) - direct_resize(rgb, prep))
    assert difference[..., :2].max() <= 1.0 + 1e-3  # gradients and fine texture: at most one level
    assert difference.mean() < 0.5  # the blue channel's hard 255→0 edges differ by a few levels
    assert difference.max() > 0.5  # the reduction step did run: not the direct path


def test_png_overlays_are_lossless_and_jpeg_close():
    rgb = smooth_photo(60, 90)
    for image_format in ("png", "jpg"):
        buffer = io.BytesIO()
        encoded_image(rgb, image_format)(buffer)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")).astype(np.int16)
        if image_format == "png":
            assert np.array_equal(decoded, rgb)
        else:
            assert np.abs(decoded - rgb).mean() < 10  # quality 90, on a fine 3-pixel checker (JPEG's hard case)
    with pytest.raises(ValueError, match="unknown image format 'gif'"):
        encoded_image(rgb, "gif")


@pytest.mark.parametrize("resample, gap", [(Image.Resampling.LANCZOS, 2.0), (Image.Resampling.BILINEAR, 2.0),
                                          (Image.Resampling.BILINEAR, 1.0)])  # the last: sweep frames
def test_fit_within_downscales_the_longer_side_keeps_flat_areas_and_never_upscales(resample, gap):
    image = np.random.default_rng(0).integers(0, 256, (300, 450, 3), dtype=np.uint8)
    assert fit_within(image, 128, resample, gap).shape == (85, 128, 3)  # 300 · 128/450 = 85.3
    assert fit_within(image, 450, resample, gap) is image and fit_within(image, 1000, resample, gap) is image
    flat = np.full((300, 450, 3), 77, dtype=np.uint8)
    assert (fit_within(flat, 128, resample, gap) == 77).all()  # the filters average: a flat picture stays flat
    # noise averages out: each output pixel is a mean over many inputs (no aliasing), far from 0 and 255
    assert np.abs(fit_within(image, 64, resample, gap).astype(float) - 127.5).mean() < 20
