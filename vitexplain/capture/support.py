"""Which models the capture can record faithfully, checked twice: by structure before any weights are
loaded, and by value on every batch recorded.

The methods read each block's attention as the row-stochastic matrix ``A`` that the block multiplies with
``v``. timm's ``VisionTransformer`` family (ViT, DeiT, DeiT-III, FlexiViT, DINOv2, SigLIP, registers,
any pooling) records exactly that through ``attn_drop``. Other architectures either attend over
something else (CaiT's class-attention blocks, XCiT's channel attention), record a tensor that is not
that matrix (differential attention subtracts two softmax maps after ``attn_drop``), or run a forward of
their own (NaFlexViT, EVA, BEiT, Swin): they are refused with one clear line, never explained wrongly.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

ROW_TOLERANCE = 1e-2  # |row sum − 1| allowed: float32 is ~1e-6, bfloat16 / float16 softmax ~4e-3
SUPPORTED = "timm's VisionTransformer family (vit_*, deit_*, deit3_*, flexivit_*, …)"


class UnsupportedModelError(ValueError):
    """The model, or what its attention recorded, is not something the methods can explain."""


def check_supported(model: nn.Module, name: str) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is a timm ``VisionTransformer`` whose blocks use
    timm's ``Attention`` (or a subclass). Works on a model built on the meta device (no weights)."""
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    blocks = getattr(model, "blocks", None)
    if not blocks or not all(hasattr(getattr(b, "attn", None), "attn_drop") for b in blocks):
        raise UnsupportedModelError(
            f"{name!r} has no ViT attention blocks (model.blocks[i].attn); vitexplain explains Vision "
            f"Transformers of {SUPPORTED}, such as deit_tiny_patch16_224 or vit_base_patch16_224")
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{name!r} is a {type(model).__name__}, not a plain token-attention ViT: vitexplain explains "
            f"{SUPPORTED}, whose every block attends over all tokens")
    odd = {type(b.attn).__name__ for b in blocks if not isinstance(b.attn, Attention)}
    if odd:
        raise UnsupportedModelError(
            f"{name!r} uses {', '.join(sorted(odd))} attention, whose recorded tensor is not the matrix it applies "
            f"to the values: vitexplain explains blocks with timm's Attention")


def check_shape(attention: Tensor, module: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``attention`` — ``(B, H, N, N)``, or the head mean
    ``(B, N, N)`` — recorded for ``module`` is square and has the module's heads. Reads no values."""
    heads = getattr(module, "num_heads", None)
    square = attention.dim() in (3, 4) and attention.shape[-1] == attention.shape[-2]
    if not square or (heads is not None and attention.dim() == 4 and attention.shape[1] != heads):
        raise UnsupportedModelError(
            f"{type(module).__name__} recorded attention of shape {tuple(attention.shape)}, not (batch, {heads} "
            "heads, tokens, tokens): it is not the matrix the block applies to its values")


def row_statistics(attention: Tensor) -> Tensor:
    """``[all finite, smallest entry, smallest row sum, largest row sum]`` of the first sample of
    ``attention``, on its device: computed without waiting for it (no copy to the host)."""
    sample = attention.detach()[0].float()
    sums = sample.sum(dim=-1)
    return torch.stack([sample.isfinite().all().float(), sample.amin(), sums.amin(), sums.amax()])


def check_statistics(recorded: Sequence[tuple[nn.Module, Tensor]]) -> None:
    """Raise :class:`UnsupportedModelError` unless every recorded map — by its :func:`row_statistics`, fetched
    in one copy — is, where finite, non-negative with rows summing to 1. The first sample of each batch is
    checked (a model's behaviour does not change within a batch); non-finite values are left to the outputs,
    which fail with that reason."""
    if not recorded:
        return
    values = torch.stack([statistics.to(recorded[0][1].device) for _, statistics in recorded]).cpu().tolist()
    for (module, _), (finite, smallest, low, high) in zip(recorded, values):
        if not finite:
            continue  # NaN or inf weights, not a wrong module: the outputs fail one by one
        if smallest < -ROW_TOLERANCE or max(abs(low - 1), abs(high - 1)) > ROW_TOLERANCE:
            raise UnsupportedModelError(
                f"{type(module).__name__} recorded a tensor that is not row-stochastic attention (entries ≥ "
                f"{smallest:.3g}, rows summing to {low:.3g}–{high:.3g}): it is not the matrix the block applies "
                "to its values")


def check_recorded(attention: Tensor, module: nn.Module) -> None:
    """:func:`check_shape` and :func:`check_statistics` for one recorded map."""
    check_shape(attention, module)
    check_statistics([(module, row_statistics(attention))])
