"""Which tokens are what: where the patches sit in a ViT's sequence, and which tokens the prediction reads."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens sit in a ViT's token sequence.

    Tokens are ``[prefix_0 … prefix_{P-1}, patch_0 … patch_{gh·gw-1}]`` with
    patches in row-major grid order. ``protected_tokens`` are the prefix tokens the
    classifier reads (CLS, DeiT's distillation token); their self-attention
    entries are never discarded.
    """

    num_prefix_tokens: int
    grid: tuple[int, int]
    protected_tokens: tuple[int, ...] = ()

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


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
