"""Gradient Attention Rollout: class-specific rollout.

Per layer and head the map is ``relu(A ⊙ ∂y_c/∂A)``: attention weighted by
the gradient of the target logit ``y_c``, negative contributions removed
(per head, before fusion, as in the original implementation and in Chefer et
al. 2021). The maps are then fused over heads and rolled out exactly as in
:mod:`vitexplain.methods.rollout`.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .base import Fusion, TokenLayout, fuse_layers
from .rollout_kernel import rollout_masks


def gradient_weighting(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> list[Tensor]:
    """``relu(A_l ⊙ G_l)`` per layer, computed in float32."""
    if len(attentions) != len(gradients):
        raise ValueError(f"{len(attentions)} attention maps but {len(gradients)} gradients")
    return [(a.float() * g.float()).clamp_min(0) for a, g in zip(attentions, gradients)]


def gradient_rollout(
    attentions: Sequence[Tensor],
    gradients: Sequence[Tensor],
    readout: Tensor,
    layout: TokenLayout,
    fusion: Fusion = "mean",
    discard_ratio: float = 0.9,
) -> Tensor:
    """Class-specific masks ``(B, gh, gw)`` from attentions and their gradients."""
    fused = fuse_layers(gradient_weighting(attentions, gradients), fusion)
    return rollout_masks(fused, readout, layout, [discard_ratio])[:, 0]
