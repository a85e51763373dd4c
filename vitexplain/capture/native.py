"""Recording timm's plain ``Attention`` through torch's native multi-head attention kernel.

``torch._native_multi_head_attention`` (the kernel behind ``nn.MultiheadAttention``) computes exactly what
timm's explicit path computes for a plain ``Attention`` block — ``softmax(q·kᵀ/√d)·v`` then the output
projection — in one call that lays out ``q, k, v`` in one pass and can return the head mean of the
attention itself. It is used only where nothing more is needed: no gradients, eval mode, CPU, no autocast,
no attention mask.

It is a private op. Where it is missing, or a call fails or returns tensors of other shapes than
expected (a changed signature), the block is recorded through timm's public explicit path instead, for
the rest of that capture: the same maps, a little slower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from .fusion import Fusion
from .support import check_shape, row_statistics

if TYPE_CHECKING:
    from .record import Recorded

NATIVE_OP = "_native_multi_head_attention"


def native_op() -> Callable | None:
    """The private kernel, or ``None`` where this torch has none."""
    return getattr(torch, NATIVE_OP, None)


def has_native_kernel(module: nn.Module) -> bool:
    """Whether ``module`` is timm's plain ``Attention`` (no q/k or output norm, no gate, dropout as its
    ``attn_drop``, ``C = H·d`` in and out, the standard scale), which the native kernel computes exactly, and
    this torch has the kernel."""
    plain = type(module) is Attention and "forward" not in vars(module) and all(
        isinstance(getattr(module, name, None), nn.Identity) for name in ("q_norm", "k_norm", "norm")) and type(
        getattr(module, "attn_drop", None)) is nn.Dropout
    return (plain and getattr(module, "gate", None) is None and native_op() is not None
            and type(module.qkv) is nn.Linear and type(module.proj) is nn.Linear and module.proj.bias is not None
            and module.num_heads * module.head_dim == module.qkv.in_features == module.proj.out_features
            and module.scale == module.head_dim ** -0.5)


@dataclass
class NativeState:
    """Shared by the blocks of one capture: once the kernel has failed, the rest use timm's path."""

    failed: bool = False


def native_attention(module: nn.Module, x: Tensor, average: bool) -> tuple[Tensor, Tensor] | None:
    """``(output, weights)`` of ``module`` on ``x`` from the native kernel — weights ``(B, N, N)`` (head
    mean) with ``average``, else ``(B, H, N, N)`` — or ``None`` if the kernel is missing, fails, or answers
    in other shapes."""
    op = native_op()
    if op is None:
        return None
    qkv_bias = module.qkv.bias if module.qkv.bias is not None else x.new_zeros(module.qkv.out_features)
    try:
        out, weights = op(x, x, x, x.shape[-1], module.num_heads, module.qkv.weight, qkv_bias, module.proj.weight,
                          module.proj.bias, None, True, average, None)
    except (TypeError, RuntimeError, ValueError):
        return None
    batch, tokens = x.shape[:2]
    expected = (batch, tokens, tokens) if average else (batch, module.num_heads, tokens, tokens)
    if not (isinstance(out, Tensor) and isinstance(weights, Tensor) and out.shape == x.shape
            and tuple(weights.shape) == expected):
        return None
    return out, weights


def native_recording_forward(module: nn.Module, recorded: Recorded, fusion: Fusion | None,
                             keep: Callable[[Tensor], Tensor], state: NativeState) -> Callable[..., Tensor]:
    """A forward for ``module`` that records its attention through the native kernel when nothing needs
    more (no gradients, eval mode, CPU, no autocast, no mask) and the kernel works; else timm's explicit
    path, recorded by the capture's hook on ``attn_drop``."""
    average = fusion == "mean"  # the kernel returns the head mean itself

    def forward(x: Tensor, **kwargs) -> Tensor:
        if not (state.failed or torch.is_grad_enabled() or module.training or x.device.type != "cpu"
                or autocast_enabled("cpu") or kwargs.get("attn_mask") is not None or kwargs.get("is_causal")):
            result = native_attention(module, x, average)
            if result is not None:
                out, weights = result
                check_shape(weights, module)
                recorded.statistics.append((module, row_statistics(weights)))
                recorded.append(weights.float().unsqueeze(1) if average else keep(weights))
                return out
            state.failed = True
        return type(module).forward(module, x, **kwargs)

    return forward


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
