"""LeGrad (Bousselham et al., "LeGrad: An Explainability Method for Vision Transformers via Feature Formation
Sensitivity", 2024), on any timm ViT.

For each chosen block ``l`` the classifier is applied to that block's output — the model's final norm and
head, with its own pooling: ``s_l = head(norm(z_l))[c]``. ``E_l`` is the mean over heads and query rows of
``relu(∂s_l/∂A_l)``, over the patch columns; the map is the mean of ``E_l`` over the chosen blocks (the last
``--layers``), scaled to max 1.

All per-block gradients come from one forward and one backward pass: in the forward each block reads a
detached copy of the previous block's output (the same values,
:func:`vitexplain.capture.record.separated_blocks`), so ``s_l`` depends on block ``l``'s attention alone and
the gradient of ``Σ_l s_l`` with respect to ``A_l`` is exactly ``∂s_l/∂A_l``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .base import LastBlocksExplainer, Param, layers_problem
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..capture.record import Capture
    from ..capture.tokens import TokenLayout

LAYERS = Param("layers", str, "2", "How many of the last blocks to average: a number, or 'all' (2 localised best "
               "on the grid pointing game).", check=layers_problem, tag="l")


def layer_scores(model: nn.Module, outputs: Sequence[Tensor], targets: Tensor) -> Tensor:
    """``Σ_l Σ_b head(norm(z_l))[b, c_b]`` over the block outputs ``z_l`` given: each scored by the model's own
    final norm, pooling and head."""
    total = 0
    for output in outputs:
        logits = model.forward_head(model.norm(output))
        total = total + logits.gather(1, targets.view(-1, 1).to(logits.device)).sum()
    return total


def legrad_map(gradients: Sequence[Tensor], layout: TokenLayout) -> Tensor:
    """Masks ``(B, gh, gw)`` from the chosen blocks' ``∂s_l/∂A_l`` ``K × (B, H, N, N)``: the mean over blocks of
    ``mean over heads and query rows of relu(∂s_l/∂A_l)``, over the patch columns, scaled to max 1."""
    import torch

    from .rollout_steps import to_mask

    if not gradients:
        raise ValueError("no gradients")
    per_block = [gradient.float().clamp_min(0).mean(dim=(1, 2)) for gradient in gradients]  # K × (B, N)
    return to_mask(torch.stack(per_block).mean(dim=0), layout)


@register_method
class LeGrad(LastBlocksExplainer):
    """LeGrad for chosen classes."""

    name = "legrad"
    summary = "LeGrad (Bousselham et al. 2024): sensitivity of each block's own prediction to its attention."
    description = ("For each of the last --layers blocks, the model's head scores that block's output; the map is "
                   "the mean over those blocks, heads and query rows of relu(∂s_l/∂A_l), over the patches. One "
                   "forward and one backward pass per batch. One output per image and --class.")
    params = (LAYERS,)
    class_specific = True
    needs = frozenset({"attentions", "gradients", "block_outputs"})

    def target_gradients(self, capture: Capture, targets: Tensor, retain_graph: bool) -> list[Tensor | None]:
        chosen = self.gradient_layers(len(capture.attentions))
        score = layer_scores(self.model, [capture.block_outputs[i] for i in chosen], targets)
        return capture.gradients_of(score, chosen, retain_graph)

    def masks_for(self, capture: Capture, gradients: list[Tensor] | None, discard_ratios: Sequence[float]) -> Tensor:
        chosen = self.gradient_layers(len(capture.attentions))
        return legrad_map([gradients[i] for i in chosen], capture.layout).unsqueeze(1)
