"""Capture: one forward (and backward) pass of a timm ViT, recording what the methods read.

``capture_attention(model, images)`` → :class:`Capture` (logits, per-layer attention, readout weights,
token layout). Modules: :mod:`.record` (the pass), :mod:`.native` (the native-kernel fast path and its
fallback), :mod:`.tokens` (layout and readout), :mod:`.fusion` (head fusion), :mod:`.support` (which
models can be recorded faithfully).
"""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Capture": ".record",
    "capture_attention": ".record",
    "TokenLayout": ".tokens",
    "UnsupportedModelError": ".support",
    "FUSIONS": ".fusion",
    "fuse_heads": ".fusion",
})
