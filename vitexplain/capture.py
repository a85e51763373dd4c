"""Recording every block's attention probabilities (and their gradients) from a timm ViT.

timm's ``Attention`` runs fused ``scaled_dot_product_attention`` by default,
which never materialises the attention matrix. While recording, each block's
attention is switched to timm's explicit path (``fused_attn = False``:
``softmax(q·kᵀ·scale)`` then ``attn_drop``) and a forward hook on ``attn_drop``
keeps its output: exactly the matrix the block multiplies with ``v``. Both
paths compute the same function; logits agree to float rounding (tested).

Without gradients (class-agnostic methods), on CPU and outside autocast, timm's plain
``Attention`` is recorded through ``torch._native_multi_head_attention`` instead (the
kernel behind ``nn.MultiheadAttention``): the same arithmetic (outputs bit-identical,
probabilities equal to float rounding; tested), in one native call that lays out
``q, k, v`` in one pass and can return the head mean itself, ~1.4 CPU ms per image
less than timm's explicit path for deit-tiny. Anything else falls back to that path.

Gradients are taken with ``torch.autograd.grad`` with respect to the recorded
tensors themselves, so they come back in layer order (module backward hooks
would deliver them last layer first).

When the classifier reads the prefix tokens only (token pooling), the last block
updates only those: its attention is still computed, and recorded, over all
tokens, but its MLP skips the patch tokens, whose outputs nothing reads.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from .methods.base import Fusion, TokenLayout, fuse_heads


@dataclass
class Capture:
    """One forward pass: logits ``(B, C)``, attentions ``L × (B, H, N, N)``, readout ``(B, N)``."""

    logits: Tensor
    attentions: list[Tensor]
    readout: Tensor
    layout: TokenLayout

    def gradients(self, targets: Tensor, retain_graph: bool = True) -> list[Tensor]:
        """``∂y_{b,c_b}/∂A_l`` for every layer, in layer order; ``targets`` is ``(B,)``.

        Batch items are independent, so the gradient of ``Σ_b y_{b,c_b}`` with
        respect to ``A_l[b]`` is that of item ``b``'s own target logit.
        """
        if not self.attentions[0].requires_grad:
            raise RuntimeError("capture was recorded without gradients; use capture_attention(..., with_grad=True)")
        score = self.logits.gather(1, targets.view(-1, 1).to(self.logits.device)).sum()
        return list(torch.autograd.grad(score, self.attentions, retain_graph=retain_graph))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every block, first block first."""
    return [block.attn for block in model.blocks]


@contextmanager
def explicit_attention(model: nn.Module, fusion: Fusion | None = None) -> Iterator[list[Tensor]]:
    """Within the context, each block's attention probabilities are appended to the yielded list as they
    are produced: ``(B, H, N, N)``, or ``(B, 1, N, N)`` fused over heads with ``fusion`` if given."""
    modules = attention_modules(model)
    recorded: list[Tensor] = []
    saved = [getattr(m, "fused_attn", None) for m in modules]
    keep = (lambda attention: fuse_heads(attention.float(), fusion).unsqueeze(1)) if fusion else (lambda attention: attention)
    hooks = [m.attn_drop.register_forward_hook(lambda _m, _i, out: recorded.append(keep(out))) for m in modules]
    native = [m for m in modules if has_native_kernel(m)]
    for module in modules:
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    for module in native:
        module.forward = native_recording_forward(module, recorded, fusion, keep)
    try:
        yield recorded
    finally:
        for hook in hooks:
            hook.remove()
        for module, fused in zip(modules, saved):
            if fused is not None:
                module.fused_attn = fused
        for module in native:
            del module.forward


def has_native_kernel(module: nn.Module) -> bool:
    """Whether ``module`` is timm's plain ``Attention`` (no q/k or output norm, no gate, ``C = H·d`` in and
    out, the standard scale), which ``torch._native_multi_head_attention`` computes exactly."""
    plain = type(module) is Attention and "forward" not in vars(module) and all(
        isinstance(getattr(module, name, None), nn.Identity) for name in ("q_norm", "k_norm", "norm"))
    return (plain and getattr(module, "gate", None) is None and hasattr(torch, "_native_multi_head_attention")
            and type(module.qkv) is nn.Linear and type(module.proj) is nn.Linear and module.proj.bias is not None
            and module.num_heads * module.head_dim == module.qkv.in_features == module.proj.out_features
            and module.scale == module.head_dim ** -0.5)


def native_recording_forward(module: nn.Module, recorded: list[Tensor], fusion: Fusion | None,
                             keep: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    """A forward for ``module`` that records its attention through the native kernel when nothing needs
    more (no gradients, eval mode, CPU, no autocast, no mask); else timm's explicit path, recorded by the hook."""
    average = fusion == "mean"  # the kernel returns the head mean itself

    def forward(x: Tensor, **kwargs) -> Tensor:
        if (torch.is_grad_enabled() or module.training or x.device.type != "cpu" or autocast_enabled("cpu")
                or kwargs.get("attn_mask") is not None or kwargs.get("is_causal")):
            return type(module).forward(module, x, **kwargs)
        qkv_bias = module.qkv.bias if module.qkv.bias is not None else x.new_zeros(module.qkv.out_features)
        out, weights = torch._native_multi_head_attention(
            x, x, x, x.shape[-1], module.num_heads, module.qkv.weight, qkv_bias, module.proj.weight,
            module.proj.bias, None, True, average, None)
        recorded.append(weights.float().unsqueeze(1) if average else keep(weights))
        return out

    return forward


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


@contextmanager
def prefix_only_last_block(model: nn.Module, layout: TokenLayout) -> Iterator[None]:
    """Within the context, the last block returns only the prefix tokens, if the head reads nothing else.

    With token pooling the logits depend on the last block's output ``x'[:, :p]`` alone
    (``p`` prefix tokens). timm's ``Block`` computes ``x' = x + a(x)`` then
    ``x' + mlp(x')`` token by token after attention, so
    ``x'[:, :p] = x[:, :p] + a(x)[:, :p]`` and the MLP needs only those rows: the
    logits are the same and the work saved is the MLP of all patch tokens of one block.
    Other block types and heads (average, attention pool) are left as they are.
    """
    block = model.blocks[-1]
    applies = bool(layout.protected_tokens) and type(block) is Block
    if applies:
        keep = layout.num_prefix_tokens

        def forward(x: Tensor, **kwargs) -> Tensor:
            x = x[:, :keep] + block.drop_path1(block.ls1(block.attn(block.norm1(x), **kwargs)))[:, :keep]
            return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

        block.forward = forward
    try:
        yield
    finally:
        if applies:
            del block.forward


@contextmanager
def pool_input(model: nn.Module) -> Iterator[list[Tensor]]:
    """Records the token sequence entering an attention-pool head (``global_pool='map'``)."""
    pool = getattr(model, "attn_pool", None)
    recorded: list[Tensor] = []
    hook = pool.register_forward_pre_hook(lambda _m, args: recorded.append(args[0])) if pool is not None else None
    try:
        yield recorded
    finally:
        if hook is not None:
            hook.remove()


def token_layout(model: nn.Module, image_size: tuple[int, int]) -> TokenLayout:
    """Prefix tokens and patch grid of ``model`` for inputs of ``image_size`` (H, W)."""
    embed = model.patch_embed
    grid = tuple(embed.dynamic_feat_size(image_size)) if getattr(model, "dynamic_img_size", False) else tuple(embed.grid_size)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    return TokenLayout(prefix, (int(grid[0]), int(grid[1])), readout_tokens(model))


def readout_tokens(model: nn.Module) -> tuple[int, ...]:
    """Prefix tokens the classifier reads: CLS (and DeiT's distillation token) for token pooling."""
    if getattr(model, "attn_pool", None) is not None or getattr(model, "global_pool", "token") != "token":
        return ()
    return (0, 1) if hasattr(model, "head_dist") else (0,)


def readout_weights(model: nn.Module, layout: TokenLayout, batch: int, pooled: Tensor | None, device) -> Tensor:
    """``(B, N)`` weights ``r`` of the tokens the prediction is read from.

    - ``token`` pooling: the CLS token (``e_0``); DeiT distilled: ``(e_0 + e_1)/2``,
      as its prediction averages the CLS and distillation heads;
    - ``avg`` / ``max`` / ``avgmax``: uniform over the pooled tokens (patches, or all
      tokens when ``pool_include_prefix``); max pooling is approximated by the mean;
    - ``map`` (attention-pool head): the pool's own attention of its latent query
      over the tokens, averaged over heads and latents.
    """
    weights = torch.zeros(batch, layout.num_tokens, device=device)
    include_prefix = bool(getattr(model, "pool_include_prefix", False))
    first = 0 if include_prefix else layout.num_prefix_tokens
    if pooled is not None:
        weights[:, first:] = latent_pool_attention(model.attn_pool, pooled).to(device)
    elif layout.protected_tokens:
        weights[:, list(layout.protected_tokens)] = 1.0 / len(layout.protected_tokens)
    else:
        weights[:, first:] = 1.0 / (layout.num_tokens - first)
    return weights


@torch.no_grad()
def latent_pool_attention(pool: nn.Module, tokens: Tensor) -> Tensor:
    """Attention of a timm ``AttentionPoolLatent``'s latent queries over ``tokens``, ``(B, N)``.

    ``softmax(q·kᵀ·scale)`` as in its explicit path, averaged over heads and latents.
    """
    batch, n, _ = tokens.shape
    if getattr(pool, "pos_embed", None) is not None:
        tokens = tokens + pool.pos_embed.unsqueeze(0).to(tokens.dtype)
    q = pool.q(pool.latent.expand(batch, -1, -1)).reshape(batch, pool.latent_len, pool.num_heads, pool.head_dim)
    k = pool.kv(tokens).reshape(batch, n, 2, pool.num_heads, pool.head_dim)[:, :, 0]
    q, k = pool.q_norm(q.transpose(1, 2)), pool.k_norm(k.transpose(1, 2))
    attention = ((q * pool.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
    return attention.mean(dim=(1, 2))


def capture_attention(model: nn.Module, images: Tensor, with_grad: bool = False,
                      fusion: Fusion | None = None) -> Capture:
    """Run ``model`` on ``images`` ``(B, 3, H, W)`` and record what the methods need.

    With ``with_grad`` the graph is kept so that :meth:`Capture.gradients` can
    differentiate target logits with respect to each layer's attention. With a
    ``fusion``, each layer's heads are fused as soon as they are produced,
    ``(B, H, N, N) → (B, 1, N, N)``, so that the full maps of all layers are never
    held at once.
    """
    layout = token_layout(model, tuple(images.shape[-2:]))
    grad_mode = torch.enable_grad() if with_grad else torch.no_grad()
    with grad_mode, explicit_attention(model, fusion) as attentions, pool_input(model) as pooled, \
            prefix_only_last_block(model, layout):
        logits = model(images)
    if len(attentions) != len(model.blocks):
        raise RuntimeError(f"recorded {len(attentions)} attention maps for {len(model.blocks)} blocks")
    if attentions[0].shape[-1] != layout.num_tokens:  # checked on the last axis, which fusion keeps
        raise RuntimeError(
            f"attention covers {attentions[0].shape[-1]} tokens, expected {layout.num_prefix_tokens} prefix + "
            f"{layout.grid[0]}×{layout.grid[1]} patches"
        )
    readout = readout_weights(model, layout, images.shape[0], pooled[0] if pooled else None, images.device)
    return Capture(logits, list(attentions), readout, layout)
