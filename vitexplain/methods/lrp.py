"""Conservative relevance propagation (``lrp``): gradient × input of a backward pass modified by LRP rules.

The relevance of the tokens entering block ``l`` is ``R_l = Σ_channels h_l ⊙ ∂̃s/∂h_l``, where ``∂̃`` is the
backward pass under the rules of :mod:`vitexplain.capture.rules` and ``s`` the target's log-softmax
(``target="log-softmax"``) or its logit (``"logit"``). The map is ``relu(R_l)`` over the patch tokens (prefix
tokens dropped), scaled to max 1. The rules (``rule``):

- ``cp`` (Ali et al., "XAI for Transformers: Better Explanations through Conservative Propagation", ICML 2022):
  every LayerNorm's σ is a constant, ``(x − μ)/stopgrad(σ)·γ + β``, and so are the attention probabilities
  (``A·v`` with ``A`` constant); everything else (GELU included) keeps its plain gradient;
- ``cp-conservative``: ``cp`` with GELU's identity rule, ``g·gelu(u)/u``: with every bias zeroed and the logit
  target, ``Σ_tokens R_l`` equals the target logit at every block (conservation);
- ``attnlrp`` (Achtibat et al., "AttnLRP", ICML 2024): LayerNorm as in ``cp``; the gradients of both factors of
  ``q·kᵀ`` and of ``A·v`` halved (the uniform rule for a bilinear product); GELU's identity rule; the
  softmax's plain gradient.

``layer`` is ``l``: ``0`` the token embeddings entering block 0 (after position embedding), ``depth`` the
last block's output; ``auto`` is ``⌊0.75·depth + ½⌋`` (9 of 12 blocks), where the scores plateau on the
reference models. One forward pass under the rules and one backward pass per target, down to block ``l``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .base import Explainer, Param
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..capture.record import Capture
    from ..capture.tokens import TokenLayout

# rule → (attention rule, GELU identity rule), as :func:`vitexplain.capture.rules.relevance_rules` takes them
RULES: dict[str, tuple[str, bool]] = {"cp": ("constant", False), "cp-conservative": ("constant", True),
                                      "attnlrp": ("uniform", True)}
TARGETS = ("log-softmax", "logit")


def layer_problem(value: str) -> str | None:
    return None if value == "auto" or value.isdigit() else "must be a block position (0, 1, …) or 'auto'"


def chosen_layer(layer: str, depth: int) -> int:
    """The block position a ``layer`` setting names: ``auto`` is ``⌊0.75·depth + ½⌋``; ``ValueError`` past the
    last block's output (``depth``)."""
    position = int(0.75 * depth + 0.5) if layer == "auto" else int(layer)
    if position > depth:
        raise ValueError(f"--layer {position}: the model has {depth} blocks (positions 0…{depth})")
    return position


RULE = Param("rule", str, "cp", "Propagation rules: 'cp' (LayerNorm σ and attention constant), 'cp-conservative' "
             "(cp and GELU's identity rule: conserves relevance), 'attnlrp' (products' gradients halved).",
             choices=tuple(RULES), tag="")
LAYER = Param("layer", str, "auto", "Block position whose entering tokens are scored: 0 (the embeddings) … depth "
              "(the last block's output), or 'auto' (3/4 of the depth: 9 of 12).", check=layer_problem, tag="l")
TARGET = Param("target", str, "log-softmax", "Score explained: the target's 'log-softmax' (against the other "
               "classes) or its 'logit'.", choices=TARGETS, tag="")


def target_scores(logits: Tensor, targets: Tensor, target: str) -> Tensor:
    """``Σ_b s_b``: each image's target log-softmax (``target="log-softmax"``) or logit, in float32."""
    scores = logits.float().log_softmax(dim=-1) if target == "log-softmax" else logits.float()
    return scores.gather(1, targets.view(-1, 1).to(logits.device)).sum()


def relevance_map(tokens: Tensor, gradient: Tensor, layout: TokenLayout) -> Tensor:
    """Masks ``(B, gh, gw)`` from the tokens ``h`` ``(B, N, C)`` and the modified gradient of the score with
    respect to them: ``relu(Σ_channels h ⊙ g)`` over the patch tokens, scaled to max 1."""
    from .rollout_steps import to_mask

    relevance = (tokens.detach().float() * gradient.float()).sum(dim=-1).clamp_min(0)
    return to_mask(relevance, layout)


@register_method
class LayerwiseRelevance(Explainer):
    """Relevance propagation under conservative rules, for chosen classes."""

    name = "lrp"
    summary = ("Conservative relevance propagation (Ali et al. 2022, AttnLRP 2024): gradient × input under LRP "
               "rules; the most faithful map in our held-out measurements.")
    description = ("R_l = Σ_channels h_l ⊙ ∂̃s/∂h_l for the tokens entering block --layer, the backward modified by "
                   "--rule (cp: LayerNorm σ and attention probabilities constant); s the target's log-softmax or "
                   "logit. The map is relu(R_l) over the patches. One output per image and --class.")
    params = (RULE, LAYER, TARGET)
    class_specific = True
    needs = frozenset({"attentions", "gradients"})

    @classmethod
    def check_model(cls, settings: dict[str, Any], depth: int) -> None:
        chosen_layer(settings["layer"], depth)

    def position(self) -> int:
        return chosen_layer(self.settings["layer"], len(self.model.blocks))

    @property
    def capture_spec(self) -> tuple:
        return ("lrp", self.settings["rule"], self.position(), self.amp)

    def capture(self, images: Tensor) -> Capture:
        from contextlib import nullcontext

        import torch

        from ..capture.record import capture_attention
        from ..capture.rules import relevance_rules

        attention, identity_activation = RULES[self.settings["rule"]]
        autocast = torch.autocast(images.device.type, dtype=self.amp) if self.amp else nullcontext()
        with autocast, relevance_rules(self.model, attention, identity_activation):
            return capture_attention(self.model, images, with_grad=True, entering=(self.position(),))

    def target_gradients(self, capture: Capture, targets: Tensor, retain_graph: bool) -> list[Tensor]:
        """``[∂̃s/∂h_l]``: the modified gradient of the targets' scores with respect to the tokens entering block
        ``l`` (one tensor: what :meth:`masks_for` reads)."""
        import torch

        score = target_scores(capture.logits, targets, self.settings["target"])
        return list(torch.autograd.grad(score, capture.entering[self.position()], retain_graph=retain_graph))

    def masks_for(self, capture: Capture, gradients: list[Tensor] | None, discard_ratios: Sequence[float]) -> Tensor:
        return relevance_map(capture.entering[self.position()], gradients[0], capture.layout).unsqueeze(1)
