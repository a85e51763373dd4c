"""Gradient Attention Rollout: class-specific rollout.

Per layer and head the map is ``relu(A ⊙ ∂y_c/∂A)``: attention weighted by the gradient of the target
logit ``y_c``, negative contributions removed per head, before fusion. The maps are then fused over heads
and rolled out exactly as in :mod:`vitexplain.methods.rollout`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .base import RolloutExplainer
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..capture.fusion import Fusion
    from ..capture.record import Capture
    from ..capture.tokens import TokenLayout


def gradient_weighting(attentions: Sequence[Tensor], gradients: Sequence[Tensor]) -> list[Tensor]:
    """``relu(A_l ⊙ G_l)`` per layer, computed in float32."""
    if len(attentions) != len(gradients):
        raise ValueError(f"{len(attentions)} attention maps but {len(gradients)} gradients")
    return [(a.float() * g.float()).clamp_min(0) for a, g in zip(attentions, gradients)]


def gradient_rollout(attentions: Sequence[Tensor], gradients: Sequence[Tensor], readout: Tensor, layout: TokenLayout,
                     fusion: Fusion = "mean", discard_ratio: float = 0.9) -> Tensor:
    """Class-specific masks ``(B, gh, gw)`` from attentions and their gradients."""
    from .rollout_steps import fuse_layers, rollout_masks

    fused = fuse_layers(gradient_weighting(attentions, gradients), fusion)
    return rollout_masks(fused, readout, layout, [discard_ratio])[:, 0]


@register_method
class GradientRollout(RolloutExplainer):
    """Gradient Attention Rollout for chosen classes."""

    name = "grad-rollout"
    summary = "Gradient Attention Rollout: where the evidence for one class is."
    description = ("Per layer and head relu(A ⊙ ∂y_c/∂A), with y_c the target logit; then fused and rolled out "
                   "as in rollout. One output per image and --class.")
    class_specific = True
    needs = frozenset({"attentions", "gradients"})

    def head_maps(self, capture: Capture, gradients: list[Tensor] | None) -> list[Tensor]:
        return gradient_weighting([a.detach() for a in capture.attentions], gradients)
