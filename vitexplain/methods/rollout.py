"""Attention Rollout (Abnar & Zuidema, 2020).

Per layer ``F_l = fuse_h(A_l)`` over heads; the ``discard_ratio`` smallest
entries are zeroed; ``Â_l = (F_l + I) / rowsum``; the mask is the readout row
of ``Â_L ⋯ Â_1`` over the patch tokens, scaled to max 1.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .base import Fusion, TokenLayout, fuse_layers
from .rollout_kernel import rollout_masks


def rollout_weighting(attentions: Sequence[Tensor]) -> list[Tensor]:
    """Rollout weighs each head's map by nothing: the maps are the attentions."""
    return list(attentions)


def attention_rollout(
    attentions: Sequence[Tensor],
    readout: Tensor,
    layout: TokenLayout,
    fusion: Fusion = "mean",
    discard_ratio: float = 0.9,
) -> Tensor:
    """Rollout masks ``(B, gh, gw)`` from per-layer attentions ``(B, H, N, N)``."""
    fused = fuse_layers(rollout_weighting(attentions), fusion)
    return rollout_masks(fused, readout, layout, [discard_ratio])[:, 0]
