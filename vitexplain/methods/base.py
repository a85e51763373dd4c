"""Shared steps of every rollout-style method, as pure batched tensor functions.

Shapes: ``B`` batch, ``H`` heads, ``N`` tokens, ``L`` layers. Per-layer maps are
``(B, H, N, N)``; fused maps and transition matrices are ``(B, N, N)``; a
readout is a ``(B, N)`` weighting of the tokens the classifier reads.

A method differs from another only in its per-head weighting (plain attention
for rollout, ``relu(A ⊙ ∂y/∂A)`` for gradient rollout); everything after
that is shared: fuse heads → discard → add residual → roll out → mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

Fusion = Literal["mean", "max", "min"]
FUSIONS: tuple[str, ...] = ("mean", "max", "min")


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


def fuse_heads(maps: Tensor, fusion: Fusion) -> Tensor:
    """Reduce ``(B, H, N, N)`` over heads with ``mean``, ``max`` or ``min``."""
    if fusion == "mean":
        return maps.mean(dim=1)
    if fusion == "max":
        return maps.amax(dim=1)
    if fusion == "min":
        return maps.amin(dim=1)
    raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")


def check_discard_ratio(ratio: float) -> float:
    """Return ``ratio`` if it lies in [0, 1), else raise ``ValueError``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard ratio must be in [0, 1), got {ratio}")
    return ratio


def discard_lowest(fused: Tensor, ratio: float, protected: Sequence[int] = ()) -> Tensor:
    """Zero the ``⌊ratio·N²⌋`` smallest entries of each sample's ``(N, N)`` map.

    Each batch item is thresholded on its own. The diagonal entries ``(p, p)``
    of ``protected`` tokens (CLS→CLS) are never zeroed. Returns a new tensor.
    """
    check_discard_ratio(ratio)
    batch, n, _ = fused.shape
    protected_flat = torch.tensor([p * n + p for p in protected], dtype=torch.long, device=fused.device)
    k = min(int(n * n * ratio), n * n - len(protected_flat))
    if k <= 0:
        return fused.clone()
    flat = fused.reshape(batch, n * n)
    candidates = flat.clone()
    candidates[:, protected_flat] = torch.inf
    lowest = candidates.topk(k, dim=1, largest=False).indices
    return flat.scatter(1, lowest, 0.0).view(batch, n, n)


def add_residual(fused: Tensor) -> Tensor:
    """Transition matrix ``Â = (A + I) / rowsum(A + I)``: every row sums to 1."""
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    with_residual = fused + eye
    return with_residual / with_residual.sum(dim=-1, keepdim=True)


def transition_matrices(fused: Sequence[Tensor], discard_ratio: float, layout: TokenLayout) -> list[Tensor]:
    """Per layer ``Â_l = add_residual(discard_lowest(F_l))`` for fused maps ``F_l``."""
    return [add_residual(discard_lowest(f, discard_ratio, layout.protected_tokens)) for f in fused]


def rollout_readout(transitions: Sequence[Tensor], readout: Tensor) -> Tensor:
    """Readout row of the rollout: ``rᵀ Â_L Â_{L-1} ⋯ Â_1``.

    ``transitions[0]`` is the first block. Computed right-to-left as ``L``
    vector–matrix products (``O(L·N²)``), never the full ``N×N`` product.
    """
    row = readout.unsqueeze(1)
    for transition in reversed(transitions):
        row = torch.bmm(row, transition)
    return row.squeeze(1)


def to_mask(token_values: Tensor, layout: TokenLayout) -> Tensor:
    """Patch-token values ``(B, N)`` → ``(B, gh, gw)`` masks, each scaled to max 1."""
    patches = token_values[:, layout.num_prefix_tokens:]
    if patches.shape[1] != layout.num_patches:
        raise ValueError(
            f"{patches.shape[1]} patch tokens do not fill a {layout.grid[0]}×{layout.grid[1]} grid"
        )
    peak = patches.amax(dim=1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)
    return (patches / peak).view(-1, *layout.grid)


def fuse_layers(layer_maps: Sequence[Tensor], fusion: Fusion) -> list[Tensor]:
    """Fuse the heads of every layer in float32."""
    return [fuse_heads(m.float(), fusion) for m in layer_maps]


def rollout_masks(fused: Sequence[Tensor], readout: Tensor, layout: TokenLayout, discard_ratio: float) -> Tensor:
    """Masks ``(B, gh, gw)`` from fused per-layer maps: discard → residual → roll out."""
    values = rollout_readout(transition_matrices(fused, discard_ratio, layout), readout.float())
    return to_mask(values, layout)
