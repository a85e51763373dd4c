"""The one data path behind every subcommand: load → capture → method → mask → render/write."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .data import make_loader
from .explainers import Explainer
from .models import Preprocessing
from .render import overlay
from .writer import OutputWriter


@dataclass(frozen=True)
class RenderOptions:
    colormap: str = "jet"
    alpha: float = 0.5
    save_raw: bool = False
    stretch: bool = False


@dataclass
class RunSummary:
    images: int = 0
    outputs: int = 0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (try --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: Apple MPS is not available (try --device auto)")
    return torch.device(name)


def prediction_record(probabilities: torch.Tensor, target: int | None, class_names: Sequence[str]) -> dict:
    """Manifest fields for one output: the target and the model's top-1 (``None`` for a headless model)."""
    predicted = int(probabilities.argmax()) if class_names else None
    return {
        "target_name": None if target is None else class_names[target],
        "target_probability": None if target is None else float(probabilities[target]),
        "predicted": predicted,
        "predicted_name": None if predicted is None else class_names[predicted],
        "probability": None if predicted is None else float(probabilities[predicted]),
    }


def explain_paths(
    explainer: Explainer,
    paths: Sequence[Path],
    prep: Preprocessing,
    writer: OutputWriter,
    class_names: Sequence[str],
    classes: Sequence[int] | None = None,
    render: RenderOptions = RenderOptions(),
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
    on_images: Callable[[int], None] = lambda n: None,
) -> RunSummary:
    """Explain every image in ``paths`` and write one overlay (+ raw mask) per image and target."""
    summary = RunSummary()
    started = time.perf_counter()
    loader = make_loader(paths, prep, batch_size, num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        explanation = explainer.explain(batch.pixels.to(device, non_blocking=True), classes)
        probabilities = explanation.probabilities.cpu()
        masks = explanation.masks[:, :, 0].cpu().numpy()
        targets = None if explanation.targets is None else explanation.targets.cpu()
        for row, (path, original) in enumerate(zip(batch.paths, batch.originals)):
            for column in range(masks.shape[1]):
                target = None if targets is None else int(targets[row, column])
                params = {"fusion": explainer.fusion, "discard_ratio": explainer.discard_ratio, "target": target}
                mask = masks[row, column]
                image = overlay(original, mask, render.colormap, render.alpha, render.stretch)
                record = prediction_record(probabilities[row], target, class_names)
                summary.records.append(
                    writer.write(path, explainer.name, params, image, mask if render.save_raw else None, record)
                )
        summary.images += len(batch.paths)
        on_images(len(batch.paths))
    summary.outputs = len(summary.records)
    summary.seconds = time.perf_counter() - started
    return summary
