"""Propagation rules: a ViT's backward pass modified where the rules say, its forward values untouched.

Relevance propagation through a transformer (Ali et al., ICML 2022; Achtibat et al., ICML 2024) is the
gradient × input of a backward pass in which some operations are treated differently. Each rule is
applied where the operation lives — on the model's own modules, through hooks — so that it carries over
to every block built of them, never as a second hand-written forward of one architecture:

- **constant scale** (every LayerNorm and RMSNorm): ``(x − μ)/stopgrad(σ)·γ + β`` (RMSNorm:
  ``x/stopgrad(rms)·γ``): the normalisation's scale is a constant in the backward;
- **constant attention** (``attention="constant"``): the attention probabilities ``A`` are detached where the block applies
  them to the values (the output of ``attn_drop``, which the capture checks is that matrix): ``A·v`` with
  ``A`` constant, so no relevance flows through ``q``, ``k`` or the softmax;
- **uniform products** (``attention="uniform"``): the gradients of both factors of ``q·kᵀ`` and of ``A·v`` are halved
  (the uniform rule for a bilinear product), the softmax keeps its plain gradient;
- **identity activation** (``identity_activation=True``): an element-wise activation ``y = f(u)``
  (the MLPs' GELU) passes back ``g·f(u)/u``, as if it were ``u`` times a constant (``1/2`` where ``u = 0``,
  the limit for GELU and SiLU).

Each rule keeps the forward values exactly: the output is ``y.detach() + s − s.detach()`` for a surrogate
``s`` whose gradient is the rule's, and ``s − s.detach()`` is exactly zero. Logits are the model's own.

The named combinations (``cp``, ``cp-conservative``, ``attnlrp``) are :mod:`vitexplain.methods.lrp`'s. With
every bias zeroed (LayerNorm shifts included), constant attention with the identity activation makes every block, the final norm and
the head homogeneous linear maps of their input in the backward, so ``Σ h_l ⊙ ∂̃y_c/∂h_l = y_c`` at every
block ``l``: relevance is conserved (tested). GELU's plain gradient does not conserve.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from .record import explicit_path

ATTENTION_RULES = ("constant", "uniform")


def with_gradient_of(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward, ``surrogate``'s gradient in the backward (exactly ``value``: ``s − s`` is 0)."""
    return value.detach() + (surrogate - surrogate.detach())


def halve_gradient(x: Tensor) -> Tensor:
    """``x`` in the forward (``x/2 + x/2`` is exact), half its gradient in the backward."""
    half = x * 0.5
    return half + half.detach()


def constant_scale_surrogate(module: nn.Module, x: Tensor) -> Tensor | None:
    """The normalisation ``module`` of ``x`` with its scale (σ or rms) constant, up to the shift (a constant
    for the gradient), or ``None`` if ``module`` is not a LayerNorm or RMSNorm over its last axes."""
    shape = getattr(module, "normalized_shape", None)
    if shape is None:
        return None
    dims = tuple(range(-len(tuple(shape)), 0))
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    precise = torch.promote_types(x.dtype, torch.float32)  # the scale in at least float32, as the norms compute it
    if isinstance(module, nn.LayerNorm):
        centred = x - x.mean(dim=dims, keepdim=True)
        scale = (centred.detach().to(precise).pow(2).mean(dim=dims, keepdim=True) + eps).rsqrt().to(x.dtype)
        normalised = centred * scale
    elif is_rms_norm(module):
        scale = (x.detach().to(precise).pow(2).mean(dim=dims, keepdim=True) + eps).rsqrt().to(x.dtype)
        normalised = x * scale
    else:
        return None
    weight = getattr(module, "weight", None)
    return normalised * weight if weight is not None else normalised


def is_rms_norm(module: nn.Module) -> bool:
    """timm's ``RmsNorm`` family and torch's ``nn.RMSNorm``, by name (their classes vary across versions)."""
    return "rmsnorm" in type(module).__name__.lower()


def normalisation_modules(model: nn.Module) -> list[nn.Module]:
    """Every LayerNorm and RMSNorm of ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm) or is_rms_norm(m)]


def activation_modules(model: nn.Module) -> list[nn.Module]:
    """Every element-wise GELU-like activation of ``model`` (GELU, its tanh and quick forms, SiLU): the MLPs'."""
    from timm.layers import activations

    kinds = (nn.GELU, nn.SiLU, *(getattr(activations, name) for name in ("GELU", "GELUTanh", "QuickGELU", "Swish")
                                 if hasattr(activations, name)))
    return [m for m in model.modules() if isinstance(m, kinds)]


def constant_scale_hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    surrogate = constant_scale_surrogate(module, inputs[0])
    return output if surrogate is None else with_gradient_of(output, surrogate)


def identity_activation_hook(_module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    u = inputs[0]
    ratio = torch.where(u != 0, output / torch.where(u != 0, u, torch.ones_like(u)), torch.full_like(u, 0.5))
    return with_gradient_of(output, u * ratio.detach())


def detach_hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
    return output.detach()


def halve_output_hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
    return halve_gradient(output)


def halve_input_hook(_module: nn.Module, inputs: tuple) -> tuple:
    return (halve_gradient(inputs[0]), *inputs[1:])


class RuleError(ValueError):
    """A rule cannot be applied to this model's modules."""


@contextmanager
def relevance_rules(model: nn.Module, attention: str = "constant", identity_activation: bool = False) -> Iterator[None]:
    """Within the context, ``model``'s backward follows the rules: constant scale in every normalisation,
    ``attention`` ``"constant"`` or ``"uniform"`` (:data:`ATTENTION_RULES`), and the identity rule for the MLPs'
    activations if ``identity_activation``; its forward values are unchanged. Attention runs timm's explicit
    path (``fused_attn = False``), where the probabilities are a tensor the rules can reach. Raises
    :class:`RuleError` where a block lacks a module the rule needs."""
    if attention not in ATTENTION_RULES:
        raise ValueError(f"attention rule must be one of {', '.join(ATTENTION_RULES)}, got {attention!r}")
    attentions = [block.attn for block in model.blocks]
    hooks = [m.register_forward_hook(constant_scale_hook) for m in normalisation_modules(model)]
    try:
        for module in attentions:
            if attention == "constant":
                hooks.append(module.attn_drop.register_forward_hook(detach_hook))
                continue
            missing = [name for name in ("q_norm", "k_norm", "norm") if not isinstance(getattr(module, name, None), nn.Module)]
            if missing or getattr(module, "gate", None) is not None:
                raise RuleError(f"{type(module).__name__} has no {', '.join(missing) or 'ungated output'} module, "
                                "where the uniform rule halves the gradients of q·kᵀ and A·v")
            hooks.append(module.q_norm.register_forward_hook(halve_output_hook))  # q·kᵀ: q's half
            hooks.append(module.k_norm.register_forward_hook(halve_output_hook))  # … and k's half
            hooks.append(module.norm.register_forward_pre_hook(halve_input_hook))  # A·v: its output's gradient
        if identity_activation:
            hooks += [m.register_forward_hook(identity_activation_hook) for m in activation_modules(model)]
    except BaseException:
        for hook in hooks:
            hook.remove()
        raise
    try:
        with explicit_path(attentions):
            yield
    finally:
        for hook in hooks:
            hook.remove()
