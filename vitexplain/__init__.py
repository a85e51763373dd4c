"""vitexplain: what a Vision Transformer looks at — attention rollout, gradient rollout, attention flow.

The public names below are imported on first use: ``import vitexplain`` loads no torch, and changes
nothing process-wide.
"""
from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "AttentionFlow": ".methods.flow",
    "AttentionRollout": ".methods.rollout",
    "GradientRollout": ".methods.grad_rollout",
    "GradientAttention": ".methods.grad_attention",
    "CheferRelevance": ".methods.chefer",
    "LeGrad": ".methods.legrad",
    "LayerwiseRelevance": ".methods.lrp",
    "chefer_relevance": ".methods.chefer",
    "gradient_attention": ".methods.grad_attention",
    "Capture": ".capture.record",
    "capture_attention": ".capture.record",
    "Explainer": ".methods.base",
    "Explanation": ".methods.base",
    "Param": ".methods.base",
    "TokenLayout": ".capture.tokens",
    "attention_flow": ".methods.flow",
    "attention_rollout": ".methods.rollout",
    "gradient_rollout": ".methods.grad_rollout",
    "available_methods": ".methods.registry",
    "get_method": ".methods.registry",
    "register_method": ".methods.registry",
    "ModelLoadError": ".models",
    "load_model": ".models",
    "plan_model": ".models",
    "preprocessing_for": ".models",
    "Images": ".io.preprocess",
    "load_images": ".io.preprocess",
    "Preprocessing": ".io.preprocess",
    "load_image": ".io.inputs",
    "overlay": ".render.overlay",
    "overlay_image": ".render.overlay",
    "save_overlay": ".render.overlay",
    "Request": ".run.request",
    "RenderOptions": ".run.options",
    "SweepOptions": ".run.options",
    "prepare": ".run.job",
    "execute": ".run.job",
    "parse_methods": ".run.evaluation",
    "prepare_evaluation": ".run.evaluation",
    "execute_evaluation": ".run.evaluation",
    "summarize": ".run.evaluation_summary",
    "write_summary": ".run.evaluation_summary",
})
