"""The run record: one immutable description of what a run computes and writes.

A :class:`Request` holds the method and each of its parameters, the model (architecture, weights and
their content hash, preprocessing), the target classes, and every render and output option that changes
the bytes written. It alone builds the explainer (:meth:`Request.explainer`), names the outputs
(:meth:`Request.label`) and is the resume key (:attr:`Request.key`, a hash of everything that changes an
output): an identical rerun skips what is done, any change computes anew.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

from ..methods.base import Explainer, resolve_params
from ..methods.registry import get_method
from .options import RenderOptions, SweepOptions, ratios_tag

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..models import ModelPlan, ModelSource, Preprocessing


@dataclass(frozen=True)
class Request:
    """What a run asks of every image. Build it with :meth:`create`, which checks every value."""

    method: str
    params: tuple[tuple[str, Any], ...]  # every declared parameter, in declaration order
    model: ModelSource
    preprocessing: Preprocessing
    num_classes: int
    classes: tuple[int, ...] | None = None  # None: each image's top-1 (class-specific methods)
    render: RenderOptions = RenderOptions()
    sweep: SweepOptions | None = None
    amp: bool = False
    labels: tuple[str, ...] | None = None  # the head's class names, from --labels

    @classmethod
    def create(cls, method: str, model: ModelPlan, classes: Sequence[int] | None = None,
               render: RenderOptions | None = None, sweep: SweepOptions | None = None, amp: bool = False,
               stretch: bool | None = None, param_label=lambda p: p.name, **params: Any) -> "Request":
        """A checked request for ``method`` on the planned ``model``. ``stretch=None`` takes the method's own
        default for overlays; ``params`` are the method's parameters (the others keep their defaults);
        ``param_label`` names a parameter in error messages (the command line gives its flag)."""
        explainer = get_method(method)
        settings = resolve_params(explainer, params, param_label)
        if classes and not explainer.class_specific:
            raise ValueError(f"--class applies to class-specific methods, not {method}")
        if explainer.class_specific and not model.num_classes:
            raise ValueError(f"{method} needs a classifier head, and {model.name!r} has none (num_classes=0)")
        for target in classes or ():
            if not 0 <= int(target) < model.num_classes:
                raise ValueError(f"class index {target} is out of range: the model has classes 0..{model.num_classes - 1}")
        explainer.check_model(settings, model.depth)
        if sweep is not None:
            if not explainer.sweepable():
                raise ValueError(f"{method} has no discard ratio to sweep")
            settings.pop("discard_ratio")  # the sweep's ratios replace it
        render = render or RenderOptions()
        render = replace(render, stretch=explainer.stretch_overlay if stretch is None else bool(stretch))
        return cls(method, tuple(settings.items()), model.source, model.preprocessing, model.num_classes,
                   tuple(int(c) for c in classes) if classes else None, render, sweep, bool(amp), model.labels)

    @property
    def class_names(self) -> tuple[str, ...]:
        """One display name per class: the labels given, else ImageNet's first lemma or ``class_<i>``."""
        from ..models import class_names_for

        return class_names_for(self.num_classes, self.labels)

    @property
    def method_class(self) -> type[Explainer]:
        return get_method(self.method)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def outputs_per_image(self) -> int:
        return len(self.classes) if self.classes else 1

    def explainer(self, model: nn.Module, device: torch.device | None = None) -> Explainer:
        """The method, configured exactly as recorded, on ``model`` (already loaded from :attr:`model`)."""
        from .runtime import amp_dtype

        amp = amp_dtype(device or next(model.parameters()).device) if self.amp else None
        settings = self.settings
        if self.sweep is not None:
            settings["discard_ratio"] = self.sweep.ratios[0]
        return self.method_class(model, amp=amp, **settings)

    def label(self, target: int | str | None) -> str:
        """The output name after the input's stem: ``rollout_max_d0.9``, ``grad-rollout_mean_d0.9_c243``,
        ``rollout-sweep_mean_r0-0.99x20``, ``legrad_c243``: the method, the parameters that name themselves,
        the sweep's ratios, the target."""
        declared = {p.name: p for p in self.method_class.params}
        parts = [declared[name].name_part(value) for name, value in self.params]
        if self.sweep:
            parts.append(ratios_tag(self.sweep.ratios))
        if target is not None:
            parts.append(f"c{target}")
        head = f"{self.method}-sweep" if self.sweep else self.method
        return "_".join([head, *(p for p in parts if p is not None)])

    def identity(self) -> dict:
        """Everything that changes an output (the checkpoint's path does not; its content does)."""
        from ..models import labels_digest

        return {
            "method": self.method,
            "method_version": self.method_class.version,
            "params": self.settings,
            "model": self.model.identity(),
            "preprocessing": self.preprocessing.record(),
            "classes": list(self.classes) if self.classes else None,
            "render": asdict(self.render),
            "sweep": {**asdict(self.sweep), "ratios": list(self.sweep.ratios)} if self.sweep else None,
            "amp": self.amp,
            **({"labels_sha256": labels_digest(self.labels)} if self.labels else {}),  # names in the manifest
        }

    @property
    def key(self) -> str:
        """The resume key: 16 hex digits of the SHA-256 of :meth:`identity` as canonical JSON."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def record(self) -> dict:
        """The request as the manifest records it: :meth:`identity`, the checkpoint's path, and the key."""
        return {"key": self.key, **self.identity(), "model": self.model.record()}

    def describe(self) -> str:
        """One line for the run's header."""
        settings = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params)
        prep = self.preprocessing
        sweep = f", sweep {ratios_tag(self.sweep.ratios)}" if self.sweep else ""
        return (f"{self.method} ({settings or 'no parameters'}{sweep}) on {self.model.describe()}; input "
                f"{prep.size[1]}×{prep.size[0]}, mean {tuple(round(m, 4) for m in prep.mean)}, "
                f"std {tuple(round(s, 4) for s in prep.std)}")
