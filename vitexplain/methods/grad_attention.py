"""Gradient-weighted attention of the last block(s): gradient rollout's per-layer term, without the roll-out.

For each chosen block ``l``: ``M_l = relu(fuse_h(A_l ⊙ ∂y_c/∂A_l))`` — the attention weighted by the gradient
of the target logit, heads fused, then negatives removed (the order of the original gradient rollout);
with ``negatives="heads"`` negatives are removed per head before fusing instead, ``fuse_h(relu(A_l ⊙
∂y_c/∂A_l))``, which with every block and mean fusion is Grad-SAM (Barkan et al., CIKM 2021). The map is the
readout row ``rᵀ · mean_l M_l`` over the patch tokens (readouts as rollout's), scaled to max 1.

It needs one forward pass and the backward pass down to the chosen blocks only: for the last block alone,
through the head and that block.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .base import FUSION, LastBlocksExplainer, Param, layers_problem
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..capture.fusion import Fusion
    from ..capture.record import Capture
    from ..capture.tokens import TokenLayout

NEGATIVES = ("fused", "heads")


LAYERS = Param("layers", str, "1", "How many of the last blocks to average: a number, or 'all'.", check=layers_problem,
               tag="l")
NEGATIVE_REMOVAL = Param("negatives", str, "fused", "Remove negative contributions after fusing the heads ('fused', "
                         "as gradient rollout does) or per head before ('heads'; with --layers all: Grad-SAM).",
                         choices=NEGATIVES, tag="")


def gradient_attention(attentions: Sequence[Tensor], gradients: Sequence[Tensor], readout: Tensor,
                       layout: TokenLayout, fusion: Fusion = "mean", negatives: str = "fused") -> Tensor:
    """Masks ``(B, gh, gw)`` from the chosen blocks' attentions and gradients ``K × (B, H, N, N)``:
    ``rᵀ · mean_l M_l`` over the patches, ``M_l = relu(fuse_h(A_l ⊙ G_l))`` (or ``fuse_h(relu(A_l ⊙ G_l))`` with
    ``negatives="heads"``), scaled to max 1."""
    import torch

    from ..capture.fusion import fuse_heads
    from .rollout_steps import to_mask

    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
    if len(attentions) != len(gradients) or not attentions:
        raise ValueError(f"{len(attentions)} attention maps but {len(gradients)} gradients")
    maps = []
    for attention, gradient in zip(attentions, gradients):
        weighted = attention.float() * gradient.float()
        if negatives == "heads":
            maps.append(fuse_heads(weighted.clamp_min(0), fusion))
        else:
            maps.append(fuse_heads(weighted, fusion).clamp_min(0))
    mean = torch.stack(maps).mean(dim=0)  # (B, N, N)
    values = torch.bmm(readout.float().unsqueeze(1), mean).squeeze(1)
    return to_mask(values, layout)


@register_method
class GradientAttention(LastBlocksExplainer):
    """Class-specific gradient-weighted attention of the last block(s)."""

    name = "grad-attention"
    summary = "Gradient-weighted attention of the last block(s): where the evidence for one class is, read directly."
    description = ("Per chosen block relu(fuse_h(A ⊙ ∂y_c/∂A)) (--negatives heads: per head before fusing), averaged "
                   "over the last --layers blocks and read at the readout row over the patches; no roll-out. "
                   "One output per image and --class.")
    params = (FUSION, LAYERS, NEGATIVE_REMOVAL)
    class_specific = True
    needs = frozenset({"attentions", "gradients"})

    def masks_for(self, capture: Capture, gradients: list[Tensor] | None, discard_ratios: Sequence[float]) -> Tensor:
        chosen = self.gradient_layers(len(capture.attentions))
        masks = gradient_attention([capture.attentions[i].detach() for i in chosen], [gradients[i] for i in chosen],
                                   capture.readout, capture.layout, self.settings["fusion"], self.settings["negatives"])
        return masks.unsqueeze(1)

