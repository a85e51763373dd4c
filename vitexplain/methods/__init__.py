"""Explanation methods: pure tensor functions over captured attentions."""
from .base import FUSIONS, Fusion, TokenLayout, fuse_heads
from .rollout_kernel import rollout_masks
from .flow import SOLVERS, attention_flow
from .grad_rollout import gradient_rollout, gradient_weighting
from .rollout import attention_rollout, rollout_weighting

__all__ = [
    "FUSIONS",
    "SOLVERS",
    "attention_flow",
    "Fusion",
    "TokenLayout",
    "attention_rollout",
    "fuse_heads",
    "gradient_rollout",
    "gradient_weighting",
    "rollout_masks",
    "rollout_weighting",
]
