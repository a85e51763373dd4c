"""Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers", ICCV 2021 (GAE; the rule of their ViT code).

Per block ``Ā_l = mean_h(relu(∂y_c/∂A_l ⊙ A_l))`` — negatives removed per head, then the heads averaged; the
relevance starts at ``R_0 = I`` and accumulates ``R_l = R_{l-1} + Ā_l · R_{l-1}``; the map is the readout row
of ``R_L − I`` over the patch tokens (readouts as rollout's: CLS, distilled, registers, average and
attention pooling), scaled to max 1. Computed as ``L`` vector–matrix products of the readout row from the
last block down, never the ``N×N`` products, and as ``d = rᵀR − rᵀ`` itself, ``d ← d + (r + d)·Ā_l``: where
the gradients are small the subtraction of the identity would otherwise cancel the relevance in float32.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .base import Explainer
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..capture.record import Capture
    from ..capture.tokens import TokenLayout


def chefer_relevance(attentions: Sequence[Tensor], gradients: Sequence[Tensor], readout: Tensor,
                     layout: TokenLayout) -> Tensor:
    """Masks ``(B, gh, gw)``: the readout row ``rᵀ (R_L − I)`` over the patches, from attentions and their
    gradients ``L × (B, H, N, N)`` (block 1 first), scaled to max 1."""
    import torch

    from .rollout_steps import to_mask

    if len(attentions) != len(gradients):
        raise ValueError(f"{len(attentions)} attention maps but {len(gradients)} gradients")
    start = readout.float()
    excess = torch.zeros_like(start)  # d = rᵀ(I + Ā_L)⋯(I + Ā_l) − rᵀ, accumulated directly: no cancellation
    for attention, gradient in zip(reversed(attentions), reversed(gradients)):
        weighted = (attention.float() * gradient.float()).clamp_min(0).mean(dim=1)  # Ā_l, (B, N, N)
        excess = excess + torch.bmm((start + excess).unsqueeze(1), weighted).squeeze(1)
    return to_mask(excess, layout)


@register_method
class CheferRelevance(Explainer):
    """Chefer et al.'s relevance propagation for chosen classes."""

    name = "chefer"
    summary = "Chefer et al. 2021 (GAE): gradient-weighted relevance accumulated over the blocks, per class."
    description = ("Per block Ā = mean_h(relu(∂y_c/∂A ⊙ A)); R_0 = I, R_l = R_{l-1} + Ā_l·R_{l-1}; the map is the "
                   "readout row of R_L − I over the patches. One output per image and --class.")
    class_specific = True
    needs = frozenset({"attentions", "gradients"})

    def masks_for(self, capture: Capture, gradients: list[Tensor] | None, discard_ratios: Sequence[float]) -> Tensor:
        attentions = [a.detach() for a in capture.attentions]
        return chefer_relevance(attentions, gradients, capture.readout, capture.layout).unsqueeze(1)
