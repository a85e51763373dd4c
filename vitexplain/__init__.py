"""vitexplain: what a Vision Transformer looks at — attention rollout, gradient rollout, attention flow."""
from .capture import Capture, capture_attention
from .explainers import EXPLAINERS, AttentionFlow, AttentionRollout, Explainer, Explanation, GradientRollout
from .methods import TokenLayout, attention_flow, attention_rollout, gradient_rollout
from .models import ModelLoadError, load_model, preprocessing_for

__version__ = "0.1.0"

__all__ = [
    "AttentionFlow",
    "AttentionRollout",
    "Capture",
    "EXPLAINERS",
    "Explainer",
    "Explanation",
    "GradientRollout",
    "ModelLoadError",
    "TokenLayout",
    "attention_flow",
    "attention_rollout",
    "capture_attention",
    "gradient_rollout",
    "load_model",
    "preprocessing_for",
]
