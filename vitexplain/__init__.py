"""vitexplain: what a Vision Transformer looks at — attention rollout, gradient rollout, attention flow.

The public names below are imported on first use, so that ``import vitexplain.cli`` can tune the OpenMP
runtime before anything loads torch (see :mod:`vitexplain.openmp`).
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_HOMES = {
    "Capture": "capture",
    "capture_attention": "capture",
    "EXPLAINERS": "explainers",
    "AttentionFlow": "explainers",
    "AttentionRollout": "explainers",
    "Explainer": "explainers",
    "Explanation": "explainers",
    "GradientRollout": "explainers",
    "TokenLayout": "methods",
    "attention_flow": "methods",
    "attention_rollout": "methods",
    "gradient_rollout": "methods",
    "ModelLoadError": "models",
    "load_model": "models",
    "preprocessing_for": "models",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'vitexplain' has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
