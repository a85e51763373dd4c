"""Python API: model + images → masks, one class per method.

>>> explainer = AttentionRollout(model, fusion="max", discard_ratio=0.9)
>>> masks = explainer(images)          # (B, gh, gw), each scaled to max 1
>>> masks = GradientRollout(model)(images, target=243)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .capture import Capture, capture_attention
from .methods.base import Fusion, check_discard_ratio, fuse_heads
from .methods.grad_rollout import gradient_rollout
from .methods.rollout import attention_rollout


@dataclass
class Explanation:
    """Masks ``(B, T, gh, gw)`` for ``T`` targets per image, with the model's prediction.

    ``targets`` is ``(B, T)`` class indices, or ``None`` for class-agnostic methods.
    """

    masks: Tensor
    logits: Tensor
    targets: Tensor | None

    @property
    def probabilities(self) -> Tensor:
        return self.logits.float().softmax(dim=-1)


class Explainer:
    """Shared base: capture once per batch, compute masks per target."""

    name = "explainer"
    class_specific = False

    def __init__(self, model: nn.Module, fusion: Fusion = "mean", discard_ratio: float = 0.9):
        fuse_heads(torch.zeros(1, 1, 1, 1), fusion)  # validates the name
        self.model = model.eval()
        self.fusion = fusion
        self.discard_ratio = check_discard_ratio(discard_ratio)

    def capture(self, images: Tensor) -> Capture:
        return capture_attention(self.model, images, with_grad=self.class_specific)

    def explain(self, images: Tensor, classes: Sequence[int] | None = None) -> Explanation:
        raise NotImplementedError

    def __call__(self, images: Tensor, target: int | Tensor | None = None) -> Tensor:
        """Masks ``(B, gh, gw)``; ``target`` (class-specific methods only) defaults to each image's top-1."""
        classes = None if target is None else [target]
        return self.explain(images, classes).masks[:, 0]


class AttentionRollout(Explainer):
    """Attention Rollout; class-agnostic (see :mod:`vitexplain.methods.rollout`)."""

    name = "rollout"

    def explain(self, images: Tensor, classes: Sequence[int] | None = None) -> Explanation:
        cap = self.capture(images)
        masks = attention_rollout(cap.attentions, cap.readout, cap.layout, self.fusion, self.discard_ratio)
        return Explanation(masks.unsqueeze(1), cap.logits.detach(), None)


class GradientRollout(Explainer):
    """Gradient Attention Rollout for chosen classes (see :mod:`vitexplain.methods.grad_rollout`)."""

    name = "grad-rollout"
    class_specific = True

    def explain(self, images: Tensor, classes: Sequence[int | Tensor] | None = None) -> Explanation:
        """One backward pass per class in ``classes`` (each an index or a ``(B,)`` tensor); default top-1."""
        cap = self.capture(images)
        logits = cap.logits.detach()
        targets = [logits.argmax(dim=-1)] if not classes else [target_tensor(c, len(images), logits.device) for c in classes]
        attentions = [a.detach() for a in cap.attentions]
        masks = []
        for i, target in enumerate(targets):
            gradients = cap.gradients(target, retain_graph=i < len(targets) - 1)
            masks.append(gradient_rollout(attentions, gradients, cap.readout, cap.layout, self.fusion, self.discard_ratio))
        return Explanation(torch.stack(masks, dim=1), logits, torch.stack(targets, dim=1))


def target_tensor(target: int | Tensor, batch: int, device) -> Tensor:
    """A ``(B,)`` long tensor of class indices from an index or a tensor."""
    if isinstance(target, Tensor):
        return target.to(device=device, dtype=torch.long).expand(batch)
    return torch.full((batch,), int(target), dtype=torch.long, device=device)


EXPLAINERS: dict[str, type[Explainer]] = {cls.name: cls for cls in (AttentionRollout, GradientRollout)}
