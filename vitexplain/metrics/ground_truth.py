"""Maps against ground truth: boxes or masks at the image's own size.

A map ``(gh, gw)`` is upsampled bilinearly to the image's ``(H, W)`` (:func:`upsample`), then read against the
region of the target (the union of its boxes, or the object mask):

- **pointing** (Zhang et al., "Top-down Neural Attention by Excitation Backprop", 2016): 1 if the map's
  maximum (ties: the first in row-major order) lies within ``tolerance`` pixels (15, the standard) of the
  region, else 0;
- **energy** (Score-CAM's energy-based pointing game): the share of the map's non-negative mass inside the
  region — like the grid game's share, it rewards sharpness;
- **segmentation** (Chefer et al.'s ImageNet-segmentation protocol), with a mask: the map thresholded at its
  mean is the predicted object; ``pixel_accuracy`` is the share of pixels labelled right, ``miou`` the mean of
  the object's and the background's intersection over union, ``ap`` the average precision of the map's
  values ranking the mask's pixels. Each is per image, at the image's own size, and the summary averages
  images; Chefer et al.'s code works on 224×224 resized images and divides intersections and unions summed
  over the whole dataset (pixel accuracy agrees for equal-sized images; mIoU weighs large objects more there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GROUND_TRUTH_METRICS = ("pointing", "energy", "segmentation")
SEGMENTATION_FIELDS = ("pixel_accuracy", "miou", "ap")
TOLERANCE = 15


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Maps ``(n, gh, gw)`` → ``(n, H, W)``, bilinear (``align_corners=False``), float32."""
    return F.interpolate(maps.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def pointing_hit(heat: Tensor, region: Tensor, tolerance: float = TOLERANCE) -> float:
    """1.0 if the maximum of ``heat`` ``(H, W)`` (the first in row-major order) is within ``tolerance`` pixels
    (Euclidean) of a pixel of ``region`` ``(H, W)`` bool, else 0.0 (also for an empty region)."""
    width = heat.shape[1]
    peak = int(heat.flatten().argmax())
    y, x = divmod(peak, width)
    points = region.nonzero()
    if points.numel() == 0:
        return 0.0
    distance = ((points[:, 0] - y) ** 2 + (points[:, 1] - x) ** 2).min()
    return float(distance <= tolerance ** 2)


def energy(heat: Tensor, region: Tensor) -> float:
    """The share of ``heat``'s non-negative mass inside ``region`` (0 for a map with none)."""
    mass = heat.clamp_min(0)
    total = float(mass.sum())
    return float(mass[region].sum()) / total if total > 0 else 0.0


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision of ``scores`` ranking the true ``labels`` (flat): ``Σ_k (R_k − R_{k−1}) P_k`` over the
    distinct score thresholds, highest first (tied scores enter together), as scikit-learn computes it; 0 when
    no label is true."""
    labels = labels.flatten().double()
    positives = float(labels.sum())
    if positives == 0:
        return 0.0
    order = torch.sort(scores.flatten().double(), descending=True, stable=True)
    ranked = labels[order.indices]
    values = order.values
    last_of_tie = torch.ones_like(values, dtype=torch.bool)
    last_of_tie[:-1] = values[1:] != values[:-1]
    true_positives = ranked.cumsum(0)[last_of_tie]
    seen = torch.arange(1, len(values) + 1, dtype=torch.float64)[last_of_tie]
    precision, recall = true_positives / seen, true_positives / positives
    gained = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((gained * precision).sum())


def segmentation_scores(heat: Tensor, mask: Tensor) -> dict[str, float]:
    """``pixel_accuracy``, ``miou`` (object and background) and ``ap`` of ``heat`` ``(H, W)`` against ``mask``
    ``(H, W)`` bool, the map thresholded at its mean (a class absent from both prediction and mask counts IoU 1)."""
    predicted = heat > heat.mean()
    accuracy = float((predicted == mask).double().mean())
    ious = []
    for guess, truth in ((predicted, mask), (~predicted, ~mask)):
        union = float((guess | truth).sum())
        ious.append(float((guess & truth).sum()) / union if union else 1.0)
    return {"pixel_accuracy": accuracy, "miou": sum(ious) / 2, "ap": average_precision(heat, mask)}
