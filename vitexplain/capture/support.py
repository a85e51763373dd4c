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


def check_recorded(attention: Tensor, module: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``attention`` ``(B, H, N, N)`` (or the head mean
    ``(B, N, N)``) recorded for ``module`` has its heads, is square, and — where finite — non-negative with
    rows summing to 1. The first sample of the batch is checked (a model's behaviour does not change within a
    batch); non-finite values are left to the outputs, which fail with that reason."""
    heads = getattr(module, "num_heads", None)
    sample = attention.detach()[0].float()
    if sample.dim() == 2:
        sample = sample.unsqueeze(0)
    where = type(module).__name__
    if sample.dim() != 3 or sample.shape[-1] != sample.shape[-2] or (heads is not None and attention.dim() == 4
                                                                     and sample.shape[0] != heads):
        raise UnsupportedModelError(
            f"{where} recorded attention of shape {tuple(attention.shape)}, not (batch, {heads} heads, tokens, "
            "tokens): it is not the matrix the block applies to its values")
    if not bool(sample.isfinite().all()):
        return  # NaN or inf weights, not a wrong module: the outputs fail one by one (their values are not finite)
    sums = sample.sum(dim=-1)
    if float(sample.amin()) < -ROW_TOLERANCE or float((sums - 1).abs().amax()) > ROW_TOLERANCE:
        raise UnsupportedModelError(
            f"{where} recorded a tensor that is not row-stochastic attention (entries ≥ {float(sample.amin()):.3g}, "
            f"rows summing to {float(sums.amin()):.3g}–{float(sums.amax()):.3g}): it is not the matrix the block "
            "applies to its values")
