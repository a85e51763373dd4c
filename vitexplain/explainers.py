"""Python API: model + images → masks, one class per method.

>>> explainer = AttentionRollout(model, fusion="max", discard_ratio=0.9)
>>> masks = explainer(images)          # (B, gh, gw), each scaled to max 1
>>> masks = GradientRollout(model)(images, target=243)

Every method captures once per batch, builds fused per-layer maps once per
target, and only then applies the cheap, ratio-dependent part — so a sweep over
many discard ratios costs one forward (and one backward) pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch
from torch import Tensor, nn

from .capture import Capture, capture_attention
from .profiling import no_timer
from .methods.base import Fusion, check_discard_ratio, fuse_heads, fuse_layers, transitions_by_ratio
from .methods.flow import attention_flow, check_solver
from .methods.grad_rollout import gradient_weighting
from .methods.rollout_kernel import rollout_masks
from .methods.rollout import rollout_weighting


@dataclass
class Explanation:
    """Masks ``(B, T, R, gh, gw)`` for ``T`` targets and ``R`` discard ratios per image.

    ``targets`` is ``(B, T)`` class indices, or ``None`` for class-agnostic methods.
    """

    masks: Tensor
    logits: Tensor
    targets: Tensor | None
    discard_ratios: tuple[float, ...]

    @property
    def probabilities(self) -> Tensor:
        return self.logits.float().softmax(dim=-1)


class Explainer:
    """Shared base: capture → fused per-layer maps (per target) → masks (per discard ratio)."""

    name = "explainer"
    class_specific = False
    options: tuple[str, ...] = ()  # method-specific constructor options (CLI flags of the same name)
    on_progress: Callable[[int, int], None] = staticmethod(lambda done, total: None)  # within-image progress
    stretch_overlay = False  # draw overlays over the mask's own min..max range by default

    timer: Callable[[str], ContextManager] = staticmethod(no_timer)  # a StageTimer when profiling

    def __init__(self, model: nn.Module, fusion: Fusion = "mean", discard_ratio: float = 0.9,
                 amp: torch.dtype | None = None):
        """``amp``: run the forward pass under autocast with this dtype (bfloat16/float16); the
        attention math stays in float32."""
        fuse_heads(torch.zeros(1, 1, 1, 1), fusion)  # validates the name
        self.model = model.eval()
        self.fusion = fusion
        self.discard_ratio = check_discard_ratio(discard_ratio)
        self.amp = amp

    def capture(self, images: Tensor) -> Capture:
        autocast = torch.autocast(images.device.type, dtype=self.amp) if self.amp else nullcontext()
        with autocast:
            return capture_attention(self.model, images, with_grad=self.class_specific, fusion=self.recorded_fusion)

    @property
    def recorded_fusion(self) -> Fusion | None:
        """Class-agnostic methods need only the head-fused maps, so the capture keeps ``(B, 1, N, N)`` per layer
        (H× less memory); gradient methods keep every head."""
        return None if self.class_specific else self.fusion

    def gradients(self, capture: Capture, target: Tensor | None, retain_graph: bool) -> list[Tensor] | None:
        """Per-layer ``∂y_target/∂A`` for class-specific methods; ``None`` otherwise."""
        return None

    def fused_layers(self, capture: Capture, gradients: list[Tensor] | None) -> list[Tensor]:
        """Head-fused per-layer maps ``L × (B, N, N)`` (for one target's ``gradients``, if any)."""
        raise NotImplementedError

    def masks(self, fused: Sequence[Tensor], capture: Capture, discard_ratios: Sequence[float]) -> Tensor:
        """Masks ``(B, R, gh, gw)`` from fused maps, one per ratio: discard, residual, roll out."""
        return rollout_masks(fused, capture.readout, capture.layout, discard_ratios)

    def explain(self, images: Tensor, classes: Sequence[int | Tensor] | None = None,
                discard_ratios: Sequence[float] | None = None) -> Explanation:
        """Masks for each class in ``classes`` (class-specific methods; default top-1) and each ratio."""
        ratios = tuple(check_discard_ratio(r) for r in (discard_ratios or (self.discard_ratio,)))
        with self.timer("model"):
            capture = self.capture(images)
            logits = capture.logits.detach()
            targets = self.targets(logits, classes)
            gradients = [self.gradients(capture, t, retain_graph=i < len(targets) - 1) for i, t in enumerate(targets)]
        with self.timer("method"):
            masks = torch.stack([self.masks(self.fused_layers(capture, g), capture, ratios) for g in gradients], dim=1)
        stacked_targets = None if targets[0] is None else torch.stack(targets, dim=1)
        return Explanation(masks, logits, stacked_targets, ratios)

    def targets(self, logits: Tensor, classes: Sequence[int | Tensor] | None) -> list[Tensor | None]:
        if not self.class_specific:
            return [None]
        if not classes:
            return [logits.argmax(dim=-1)]
        return [target_tensor(c, logits.shape[0], logits.device) for c in classes]

    def __call__(self, images: Tensor, target: int | Tensor | None = None) -> Tensor:
        """Masks ``(B, gh, gw)``; ``target`` (class-specific methods only) defaults to each image's top-1."""
        classes = None if target is None else [target]
        return self.explain(images, classes).masks[:, 0, 0]


class AttentionRollout(Explainer):
    """Attention Rollout; class-agnostic (see :mod:`vitexplain.methods.rollout`)."""

    name = "rollout"

    def fused_layers(self, capture: Capture, gradients: list[Tensor] | None) -> list[Tensor]:
        return fuse_layers(rollout_weighting(capture.attentions), self.fusion)


class GradientRollout(Explainer):
    """Gradient Attention Rollout for chosen classes (see :mod:`vitexplain.methods.grad_rollout`)."""

    name = "grad-rollout"
    class_specific = True
    options = ("classes",)

    def gradients(self, capture: Capture, target: Tensor | None, retain_graph: bool) -> list[Tensor] | None:
        return capture.gradients(target, retain_graph=retain_graph)

    def fused_layers(self, capture: Capture, gradients: list[Tensor] | None) -> list[Tensor]:
        attentions = [a.detach() for a in capture.attentions]
        return fuse_layers(gradient_weighting(attentions, gradients), self.fusion)


class AttentionFlow(AttentionRollout):
    """Attention Flow: max-flow through the layer graph (see :mod:`vitexplain.methods.flow`)."""

    name = "flow"
    options = ("solver",)
    stretch_overlay = True  # flow values are high almost everywhere; the contrast is in the differences

    def __init__(self, model: nn.Module, fusion: Fusion = "mean", discard_ratio: float = 0.9,
                 amp: torch.dtype | None = None, solver: str = "dinic"):
        super().__init__(model, fusion, discard_ratio, amp)
        self.solver = check_solver(solver)

    def masks(self, fused: Sequence[Tensor], capture: Capture, discard_ratios: Sequence[float]) -> Tensor:
        layout = capture.layout
        return torch.stack([attention_flow(t, capture.readout, layout, self.solver, self.on_progress)
                            for t in transitions_by_ratio(fused, discard_ratios, layout)], dim=1)


def target_tensor(target: int | Tensor, batch: int, device) -> Tensor:
    """A ``(B,)`` long tensor of class indices from an index or a tensor."""
    if isinstance(target, Tensor):
        return target.to(device=device, dtype=torch.long).expand(batch)
    return torch.full((batch,), int(target), dtype=torch.long, device=device)


EXPLAINERS: dict[str, type[Explainer]] = {cls.name: cls for cls in (AttentionRollout, GradientRollout, AttentionFlow)}
