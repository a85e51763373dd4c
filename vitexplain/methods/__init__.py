"""Explanation methods, one module each, registered by name.

Each method module holds its pure, batched tensor function (testable without images or files) and its
explainer class, which declares the method's parameters and capabilities (:mod:`.base`). Built in:
:mod:`.rollout`, :mod:`.grad_rollout`, :mod:`.flow`; shared rollout steps in :mod:`.rollout_steps`;
the registry in :mod:`.registry`.
"""
from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Explainer": ".base",
    "Explanation": ".base",
    "Param": ".base",
    "RolloutExplainer": ".base",
    "available_methods": ".registry",
    "get_method": ".registry",
    "register_method": ".registry",
    "attention_rollout": ".rollout",
    "gradient_rollout": ".grad_rollout",
    "attention_flow": ".flow",
})
