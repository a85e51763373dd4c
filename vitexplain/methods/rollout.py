"""Attention Rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

Per layer ``F_l = fuse_h(A_l)`` over heads; the ``discard_ratio`` smallest entries are zeroed (the
self-attention of the tokens the classifier reads never); ``Â_l = (F_l + I) / rowsum``; the mask is the
readout row ``rᵀ Â_L ⋯ Â_1`` over the patch tokens, scaled to max 1. Class-agnostic.
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


def rollout_weighting(attentions: Sequence[Tensor]) -> list[Tensor]:
    """Rollout weighs each head's map by nothing: the maps are the attentions."""
    return list(attentions)


def attention_rollout(attentions: Sequence[Tensor], readout: Tensor, layout: TokenLayout, fusion: Fusion = "mean",
                      discard_ratio: float = 0.9) -> Tensor:
    """Rollout masks ``(B, gh, gw)`` from per-layer attentions ``(B, H, N, N)``."""
    from .rollout_steps import fuse_layers, rollout_masks

    fused = fuse_layers(rollout_weighting(attentions), fusion)
    return rollout_masks(fused, readout, layout, [discard_ratio])[:, 0]


@register_method
class AttentionRollout(RolloutExplainer):
    """Attention Rollout; class-agnostic."""

    name = "rollout"
    summary = "Attention Rollout (Abnar & Zuidema 2020): class-agnostic map of what the prediction draws on."
    description = ("Per layer: fuse heads (--fusion), zero the lowest --discard-ratio of entries, add the identity "
                   "(residual) and normalise rows; multiply the layers and read the readout row (CLS) over the patches.")

    def head_maps(self, capture: Capture, gradients: list[Tensor] | None) -> list[Tensor]:
        return rollout_weighting(capture.attentions)
