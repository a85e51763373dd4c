"""What a method is: a declaration (name, parameters, capabilities) and one entry point, ``explain``.

A method is a subclass of :class:`Explainer` in a module of its own, registered by name
(:func:`vitexplain.methods.registry.register_method`). It declares

- its **parameters** (:class:`Param`: type, default, check, help text, and how the value appears in
  output names), from which the command line builds the subcommand's options and ``--help``, and the run
  record its names and resume key;
- its **capabilities**: ``class_specific`` (one map per target class, needs gradients), ``sweepable``
  (has a discard ratio that ``sweep`` varies), ``stretch_overlay`` (overlays drawn over the mask's own
  range by default) and ``needs`` (what the capture must record: ``attentions``, ``gradients``,
  ``block_outputs``);
- and one computation, :meth:`Explainer.masks_for`: masks from what the capture recorded.

Rollout-style methods subclass :class:`RolloutExplainer` and define only their per-head weighting
(:meth:`RolloutExplainer.head_maps`); fusion, discard, residual and roll-out are shared.

This module and the method modules import torch only inside functions, so that the command line can read
every declaration (``vitexplain --help``) without loading torch, timm or numba.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Sequence

from ..capture.fusion import FUSIONS

if TYPE_CHECKING:
    from torch import Tensor, dtype, nn

    from ..capture.record import Capture

NEEDS = frozenset({"attentions", "gradients", "block_outputs"})


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    ``check(value)`` returns ``None`` or what is wrong (``"must be in [0, 1)"``). ``tag`` says how the value
    appears in output file names: ``None`` not at all, ``""`` as the bare value (``max``), ``"d"`` prefixed
    (``d0.9``). Every parameter, named or not, is part of the run's record and resume key.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    tag: str | None = None

    @property
    def flag(self) -> str:
        """The command-line option: ``--discard-ratio``."""
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any, label: str | None = None) -> Any:
        """``value`` converted to the parameter's type and checked; ``ValueError`` saying what is wrong,
        naming the parameter as ``label`` (default: its Python name)."""
        label = label or self.name
        try:
            if self.type is bool and not isinstance(value, bool):
                raise TypeError
            converted = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"{label} must be a {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and converted not in self.choices:
            raise ValueError(f"{label} must be one of {', '.join(self.choices)}, got {converted!r}")
        problem = self.check(converted) if self.check else None
        if problem:
            raise ValueError(f"{label} {problem}, got {converted!r}")
        return converted

    def name_part(self, value: Any) -> str | None:
        """How ``value`` appears in output names (``None``: it does not)."""
        if self.tag is None:
            return None
        return f"{self.tag}{value:g}" if isinstance(value, float) else f"{self.tag}{value}"


def unit_interval_problem(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def check_discard_ratio(ratio: float) -> float:
    """Return ``ratio`` if it lies in [0, 1), else raise ``ValueError``."""
    return DISCARD_RATIO.parse(ratio, "discard ratio")


def layers_problem(value: str) -> str | None:
    return None if value == "all" or (value.isdigit() and int(value) >= 1) else "must be a number of blocks (1, 2, …) or 'all'"


def chosen_layers(layers: str, depth: int) -> list[int]:
    """The block indices a ``layers`` setting names: the last ``K``, or all ``depth``."""
    count = depth if layers == "all" else int(layers)
    if count > depth:
        raise ValueError(f"--layers {count}: the model has {depth} blocks")
    return list(range(depth - count, depth))


FUSION = Param("fusion", str, "mean", "How to fuse attention heads per layer.", choices=FUSIONS, tag="")
DISCARD_RATIO = Param("discard_ratio", float, 0.9, "Fraction of each layer's lowest fused attention entries zeroed, "
                      "in [0, 1).", check=unit_interval_problem, tag="d")


@dataclass
class Explanation:
    """Masks ``(B, T, R, gh, gw)`` for ``T`` targets and ``R`` discard ratios per image (``R = 1`` for methods
    without a discard ratio, whose ``discard_ratios`` is ``()``). ``targets`` is ``(B, T)`` class indices, or
    ``None`` for class-agnostic methods."""

    masks: Tensor
    logits: Tensor
    targets: Tensor | None
    discard_ratios: tuple[float, ...]

    @property
    def probabilities(self) -> Tensor:
        return self.logits.float().softmax(dim=-1)


def no_timer(stage: str) -> ContextManager[None]:
    """The timer used when not profiling: times nothing."""
    from contextlib import nullcontext

    return nullcontext()


class Explainer:
    """Base of every method: capture → (per target) gradients → :meth:`masks_for`.

    ``Method(model, *values, amp=None, **params)``: parameters by position (in declaration order) or by
    name; each is checked. ``amp`` runs the forward pass under autocast with that dtype
    (bfloat16/float16); the attention math stays float32.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line: the method and its source (``vitexplain --help``)
    description: ClassVar[str] = ""  # the math in a paragraph (``vitexplain NAME --help``)
    params: ClassVar[tuple[Param, ...]] = ()
    class_specific: ClassVar[bool] = False
    stretch_overlay: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"attentions"})
    version: ClassVar[int] = 1  # raise when the method's output changes: it is part of the resume key

    on_progress: Callable[[int, int], None] = staticmethod(lambda done, total: None)  # within-image progress
    timer: Callable[[str], ContextManager] = staticmethod(no_timer)  # a StageTimer when profiling

    def __init__(self, model: nn.Module, *values: Any, amp: dtype | None = None, **params: Any):
        if len(values) > len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} parameters, got {len(values)} values")
        for param, value in zip(self.params, values):
            if param.name in params:
                raise TypeError(f"{self.name}: {param.name} given twice")
            params[param.name] = value
        self.settings = resolve_params(type(self), params)
        for key, value in self.settings.items():
            setattr(self, key, value)
        self.model = model.eval()
        self.amp = amp

    @classmethod
    def sweepable(cls) -> bool:
        """Whether the method has a discard ratio, which ``sweep`` varies over one capture."""
        return any(p.name == "discard_ratio" for p in cls.params)

    @property
    def recorded_fusion(self) -> str | None:
        """Heads fused while recording (``(B, 1, N, N)`` per layer, H× less memory) where the method needs
        only the fused attention; ``None`` keeps every head."""
        return None

    def capture(self, images: Tensor) -> Capture:
        from contextlib import nullcontext

        import torch

        from ..capture.record import capture_attention

        autocast = torch.autocast(images.device.type, dtype=self.amp) if self.amp else nullcontext()
        with autocast:
            return capture_attention(self.model, images, with_grad="gradients" in self.needs,
                                     fusion=self.recorded_fusion, block_outputs="block_outputs" in self.needs)

    def target_gradients(self, capture: Capture, targets: Tensor, retain_graph: bool) -> list[Tensor | None]:
        """Per block, the gradient the method weighs attention with, for one ``(B,)`` target each image:
        ``∂y_c/∂A_l`` of the target logit for the blocks of :meth:`gradient_layers` (``None`` for the others)."""
        return capture.gradients(targets, retain_graph=retain_graph,
                                 layers=self.gradient_layers(len(capture.attentions)))

    def gradient_layers(self, depth: int) -> Sequence[int] | None:
        """The blocks whose attention gradients the method reads (``None``: all ``depth``); the backward pass
        goes only as deep as they need."""
        return None

    @classmethod
    def check_model(cls, settings: dict[str, Any], depth: int) -> None:
        """Raise ``ValueError`` if ``settings`` do not fit a model of ``depth`` blocks (checked before any
        weights are loaded)."""

    def masks_for(self, capture: Capture, gradients: list[Tensor] | None, discard_ratios: Sequence[float]) -> Tensor:
        """The method: masks ``(B, R, gh, gw)`` from ``capture`` (and one target's per-layer ``gradients``
        ``∂y_c/∂A_l`` for class-specific methods), one per discard ratio (``R = 1`` without one)."""
        raise NotImplementedError

    def explain(self, images: Tensor, classes: Sequence[int | str | Tensor] | None = None,
                discard_ratios: Sequence[float] | None = None) -> Explanation:
        """Masks ``(B, T, R, gh, gw)`` for each of the ``T`` classes in ``classes`` (class-specific methods:
        indices, names or ``(B,)`` tensors; default each image's top-1, ``T = 1``) and each of the ``R`` discard
        ratios (sweepable methods; default the method's own, ``R = 1``)."""
        self.ratios(discard_ratios)  # checked before the model runs
        self.check_classes(classes)
        with self.timer("model"):
            capture = self.capture(images)
        return self.explain_captured(capture, classes, discard_ratios)

    @property
    def capture_spec(self) -> tuple:
        """What :meth:`capture` records; methods with equal specs can share one capture
        (:meth:`explain_captured`)."""
        return ("gradients" in self.needs, self.recorded_fusion, "block_outputs" in self.needs, self.amp)

    def explain_captured(self, capture: Capture, classes: Sequence[int | str | Tensor] | None = None,
                         discard_ratios: Sequence[float] | None = None, keep_graph: bool = False) -> Explanation:
        """:meth:`explain` from a capture already recorded with this method's :attr:`capture_spec`;
        ``keep_graph`` leaves its graph for another method's gradients."""
        import torch

        ratios = self.ratios(discard_ratios)
        self.check_classes(classes)
        with self.timer("model"):
            logits = capture.logits.detach()
            targets = self.targets(logits, classes)
            gradients = [self.target_gradients(capture, t, retain_graph=keep_graph or i < len(targets) - 1)
                         if t is not None else None for i, t in enumerate(targets)]
        with self.timer("method"):
            masks = torch.stack([self.masks_for(capture, g, ratios) for g in gradients], dim=1)
        stacked_targets = None if targets[0] is None else torch.stack(targets, dim=1)
        return Explanation(masks, logits, stacked_targets, ratios)

    def check_classes(self, classes) -> None:
        if classes and not self.class_specific:
            raise ValueError(f"{self.name} is class-agnostic: it takes no classes")

    def ratios(self, discard_ratios: Sequence[float] | None) -> tuple[float, ...]:
        if not self.sweepable():
            if discard_ratios:
                raise ValueError(f"{self.name} has no discard ratio to sweep")
            return ()
        return tuple(check_discard_ratio(r) for r in (discard_ratios or (self.settings["discard_ratio"],)))

    def targets(self, logits: Tensor, classes: Sequence[int | str | Tensor] | None) -> list[Tensor | None]:
        """Per target, a ``(B,)`` tensor of class indices: each class as given (an index, a name such as
        ``"tiger cat"``, or a ``(B,)`` tensor), else each image's top-1."""
        if not self.class_specific:
            return [None]
        if not classes:
            return [logits.argmax(dim=-1)]
        return [target_tensor(c, logits.shape[0], logits.device, logits.shape[-1]) for c in classes]

    def __call__(self, images: Tensor, target: int | str | Tensor | None = None) -> Tensor:
        """Masks ``(B, gh, gw)``; ``target`` (class-specific methods only: an index, a class name or a
        ``(B,)`` tensor) defaults to each image's top-1."""
        classes = None if target is None else [target]
        return self.explain(images, classes).masks[:, 0, 0]


class LastBlocksExplainer(Explainer):
    """A method that reads the last blocks only (its ``layers`` parameter: a number, or ``all``): checked
    against the model's depth before any weights load, and the backward pass goes no deeper."""

    @classmethod
    def check_model(cls, settings: dict[str, Any], depth: int) -> None:
        chosen_layers(settings["layers"], depth)

    def gradient_layers(self, depth: int) -> Sequence[int]:
        return chosen_layers(self.settings["layers"], depth)


class RolloutExplainer(Explainer):
    """A rollout-style method: per-head weighting (:meth:`head_maps`) → fuse heads → discard → residual →
    roll out (:mod:`vitexplain.methods.rollout_steps`)."""

    params = (FUSION, DISCARD_RATIO)

    @property
    def recorded_fusion(self) -> str | None:
        return None if "gradients" in self.needs else self.settings["fusion"]

    def head_maps(self, capture: Capture, gradients: list[Tensor] | None) -> list[Tensor]:
        """The weighting: per-layer maps ``(B, H, N, N)`` (or ``(B, 1, N, N)`` if fused while recording)."""
        raise NotImplementedError

    def fused_layers(self, capture: Capture, gradients: list[Tensor] | None) -> list[Tensor]:
        """Head-fused per-layer maps ``L × (B, N, N)``."""
        from .rollout_steps import fuse_layers

        return fuse_layers(self.head_maps(capture, gradients), self.settings["fusion"])

    def masks_for(self, capture: Capture, gradients: list[Tensor] | None, discard_ratios: Sequence[float]) -> Tensor:
        from .rollout_steps import rollout_masks

        return rollout_masks(self.fused_layers(capture, gradients), capture.readout, capture.layout, discard_ratios)


def resolve_params(method: type[Explainer], given: dict[str, Any], label: Callable[[Param], str] = lambda p: p.name) -> dict[str, Any]:
    """Every declared parameter of ``method``: given values checked, the others at their defaults.
    Unknown names raise ``TypeError``; bad values ``ValueError`` naming the parameter as ``label(param)``."""
    known = {p.name for p in method.params}
    unknown = sorted(set(given) - known)
    if unknown:
        offered = ", ".join(sorted(known)) or "none"
        raise TypeError(f"{method.name} has no parameter {unknown[0]!r} (its parameters: {offered})")
    return {p.name: p.parse(given.get(p.name, p.default), label(p)) for p in method.params}


def target_tensor(target: int | str | Tensor, batch: int, device, num_classes: int) -> Tensor:
    """A ``(B,)`` long tensor of class indices from an index, a class name (ImageNet lemmas for a 1000-class
    head, ``class_<i>`` otherwise) or a tensor; ``ValueError`` for an unknown name or an index out of range."""
    import torch

    from ..models import class_synonyms_for, resolve_class

    if isinstance(target, torch.Tensor):
        return target.to(device=device, dtype=torch.long).expand(batch)
    index = resolve_class(target, class_synonyms_for(num_classes))
    return torch.full((batch,), index, dtype=torch.long, device=device)
