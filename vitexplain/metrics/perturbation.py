"""Deletion and insertion (Petsiuk et al., "RISE", 2018) at the model's patch granularity.

A map ``(gh, gw)`` ranks the ``P = gh·gw`` patches, highest first, ties broken by the lower patch index
(row-major). At step ``k = 0…S`` the first ``⌊k·P/S⌋`` patches of that order are perturbed:

- **deletion**: those patches of the model input are set to the baseline (step 0 is the image, step ``S`` the
  baseline everywhere);
- **insertion**: the input is the baseline everywhere except those patches (step 0 is the baseline, step ``S``
  the image).

The score at each step is the softmax probability of the target class; the metric is the area under that
curve by the trapezoid rule over ``k/S ∈ [0, 1]``. Deletion: lower is better (the map found what the
prediction rests on); insertion: higher is better.

Chefer et al.'s perturbation protocol (CVPR 2021), as their code computes it: the map's top (**positive**) or
bottom (**negative**) ``int(P·f)`` patches are set to the baseline for the fractions ``f = 0, 0.1, …, 0.9``
(ties: the lower index first either way); the score is whether the model's top-1 class still equals the
explained target (1 or 0); the metric is ``np.trapz(accuracy, fractions) × 100`` over the dataset, which is
the mean over images of each image's own ``trapz × 100`` (the trapezoid rule is linear). Positive: lower is
better; negative: higher is better.

Baselines, in the normalised model input: ``mean`` is 0, i.e. the normalisation's mean colour; ``blur`` is
the image blurred by a Gaussian of σ = 5 pixels on an 11 × 11 kernel (RISE's), each channel on its own, the
border reflected.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("deletion", "insertion", "positive", "negative")
CHEFER_METRICS = ("positive", "negative")
CHEFER_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # their perturbation_steps
BASELINES = ("mean", "blur")
BLUR_SIGMA, BLUR_SIZE = 5.0, 11


def patch_ranks(maps: Tensor) -> Tensor:
    """``(n, P)`` rank of each patch of the maps ``(n, gh, gw)``: 0 for the highest value, ties broken by the
    lower patch index."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def step_counts(patches: int, steps: int) -> list[int]:
    """How many patches are perturbed at each step ``k = 0…S``: ``⌊k·P/S⌋``."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return [k * patches // steps for k in range(steps + 1)]


def fraction_counts(patches: int) -> list[int]:
    """How many patches Chefer et al.'s protocol removes at each fraction: ``int(P·f)``."""
    return [int(patches * fraction) for fraction in CHEFER_FRACTIONS]


def gaussian_blur(pixels: Tensor, sigma: float = BLUR_SIGMA, size: int = BLUR_SIZE) -> Tensor:
    """``pixels`` ``(n, C, H, W)`` blurred by a normalised Gaussian of ``sigma`` on a ``size × size`` kernel,
    separably, each channel alone, the border reflected."""
    offsets = torch.arange(size, dtype=torch.float32, device=pixels.device) - (size - 1) / 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(pixels.dtype)
    channels = pixels.shape[1]
    pad = size // 2
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="reflect")
    across = F.conv2d(padded, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(across, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def baseline_inputs(pixels: Tensor, baseline: str) -> Tensor:
    """The baseline each patch is replaced with, for normalised model inputs ``(n, C, H, W)``."""
    if baseline == "mean":
        return torch.zeros_like(pixels)
    if baseline == "blur":
        return gaussian_blur(pixels)
    raise ValueError(f"unknown baseline {baseline!r}; choose {' or '.join(BASELINES)}")


def patch_size(pixels: Tensor, grid: tuple[int, int]) -> tuple[int, int]:
    """The pixels per patch of inputs ``(…, H, W)`` on a ``grid``; ``ValueError`` unless it divides them."""
    height, width = pixels.shape[-2:]
    gh, gw = grid
    if height % gh or width % gw:
        raise ValueError(f"the input {height}×{width} is not a whole number of {gh}×{gw} patches")
    return height // gh, width // gw


def perturbed_inputs(pixels: Tensor, baselines: Tensor, perturbed: Tensor, grid: tuple[int, int]) -> Tensor:
    """``pixels`` ``(n, C, H, W)`` with the patches where ``perturbed`` ``(n, P)`` is true taken from
    ``baselines``."""
    ph, pw = patch_size(pixels, grid)
    mask = perturbed.view(-1, 1, grid[0], 1, grid[1], 1).expand(-1, 1, grid[0], ph, grid[1], pw)
    return torch.where(mask.reshape(-1, 1, grid[0] * ph, grid[1] * pw), baselines, pixels)


def perturbation_curves(model: Callable[[Tensor], Tensor], pixels: Tensor, baselines: Tensor, images: Tensor,
                        maps: Tensor, targets: Tensor, insertion: Tensor, steps: int, batch_size: int,
                        autocast: Callable[[], ContextManager] = nullcontext, counts: list[int] | None = None,
                        top1: bool = False) -> Tensor:
    """Scores ``(n, S+1)`` of ``n`` deletion or insertion runs: run ``j`` perturbs image ``images[j]`` of
    ``pixels`` ``(m, C, H, W)`` (with its ``baselines``) in the order of ``maps[j]`` ``(gh, gw)``, scoring the
    softmax probability of ``targets[j]``; ``insertion[j]`` says which of the two it is. ``counts`` replaces
    the ``⌊k·P/S⌋`` patches of each step (``S + 1 = len(counts)``); with ``top1`` the score is whether the
    top-1 class is ``targets[j]`` (Chefer et al.'s protocol: ``counts`` from :func:`fraction_counts`, the
    map negated for the negative run).

    All ``n·(S+1)`` perturbed inputs go through ``model`` in chunks of ``batch_size``, built chunk by chunk
    (never all at once), under ``autocast()``, without gradients.
    """
    count = maps.shape[0]
    grid = tuple(maps.shape[-2:])
    ranks = patch_ranks(maps)
    counts = torch.tensor(step_counts(ranks.shape[1], steps) if counts is None else counts, device=pixels.device)
    steps = len(counts) - 1
    device = pixels.device
    images, targets, insertion = images.to(device), targets.to(device), insertion.to(device)
    scores = torch.empty(count * (steps + 1), dtype=torch.float32, device=device)
    with torch.inference_mode():
        for start in range(0, count * (steps + 1), batch_size):
            rows = torch.arange(start, min(start + batch_size, count * (steps + 1)), device=device)
            run, step = rows // (steps + 1), rows % (steps + 1)
            hidden = ranks[run] < counts[step].unsqueeze(1)  # (chunk, P): the first ⌊k·P/S⌋ patches
            from_baseline = hidden ^ insertion[run].unsqueeze(1)
            source = images[run]
            inputs = perturbed_inputs(pixels[source], baselines[source], from_baseline, grid)
            with autocast():
                logits = model(inputs)
            if top1:
                scores[rows] = (logits.argmax(dim=-1) == targets[run]).float()
            else:
                probabilities = logits.float().softmax(dim=-1)
                scores[rows] = probabilities.gather(1, targets[run].view(-1, 1)).squeeze(1)
    return scores.view(count, steps + 1)


def area_under_curve(curves: Tensor) -> Tensor:
    """AUC of curves ``(…, S+1)`` sampled at ``k/S``, by the trapezoid rule over [0, 1]."""
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[-1] - 1), dim=-1)


def chefer_area(curves: Tensor) -> Tensor:
    """``np.trapz(accuracy, CHEFER_FRACTIONS) × 100`` of curves ``(…, 10)``."""
    fractions = torch.tensor(CHEFER_FRACTIONS, dtype=curves.dtype, device=curves.device)
    return torch.trapezoid(curves, x=fractions, dim=-1) * 100
