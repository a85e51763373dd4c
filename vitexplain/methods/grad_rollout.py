"""Gradient Attention Rollout (the class-specific rollout of Abnar & Zuidema's reference code,
``vit_grad_rollout.py``).

Per layer the map is ``relu(fuse_h(A ⊙ ∂y_c/∂A))``: attention weighted by the gradient of the target logit
``y_c`` head by head, the heads fused (``--fusion``), and only then the negative entries removed — the
order of the original ``grad_rollout()``, ``(attention * grad).mean(axis=1)`` followed by clamping. The
maps are then discarded, given the residual and rolled out exactly as in :mod:`vitexplain.methods.rollout`.
(Removing negatives per head before fusing is a different method: Chefer et al.'s rule.)
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
    """``A_l ⊙ G_l`` per layer and head, computed in float32 (signed: negatives are removed after fusion)."""
    if len(attentions) != len(gradients):
        raise ValueError(f"{len(attentions)} attention maps but {len(gradients)} gradients")
    return [a.float() * g.float() for a, g in zip(attentions, gradients)]


def fused_gradient_maps(attentions: Sequence[Tensor], gradients: Sequence[Tensor], fusion: Fusion) -> list[Tensor]:
    """``relu(fuse_h(A_l ⊙ G_l))`` per layer: ``L × (B, N, N)``."""
    from .rollout_steps import fuse_layers

    return [fused.clamp_min(0) for fused in fuse_layers(gradient_weighting(attentions, gradients), fusion)]


def gradient_rollout(attentions: Sequence[Tensor], gradients: Sequence[Tensor], readout: Tensor, layout: TokenLayout,
                     fusion: Fusion = "mean", discard_ratio: float = 0.9) -> Tensor:
    """Class-specific masks ``(B, gh, gw)`` from attentions and their gradients ``L × (B, H, N, N)``."""
    from .rollout_steps import rollout_masks

    fused = fused_gradient_maps(attentions, gradients, fusion)
    return rollout_masks(fused, readout, layout, [discard_ratio])[:, 0]


@register_method
class GradientRollout(RolloutExplainer):
    """Gradient Attention Rollout for chosen classes."""

    name = "grad-rollout"
    summary = "Gradient Attention Rollout: where the evidence for one class is."
    description = ("Per layer relu(fuse_h(A ⊙ ∂y_c/∂A)), with y_c the target logit: heads fused first, negatives "
                   "removed after, as in the original implementation; then discarded and rolled out as in rollout. "
                   "One output per image and --class.")
    class_specific = True
    needs = frozenset({"attentions", "gradients"})
    version = 2  # 1 removed negatives per head, before fusion

    def fused_layers(self, capture: Capture, gradients: list[Tensor] | None) -> list[Tensor]:
        return fused_gradient_maps([a.detach() for a in capture.attentions], gradients, self.settings["fusion"])
