"""The steps rollout-style methods share, as pure batched tensor functions.

Shapes: ``B`` batch, ``H`` heads, ``N`` tokens, ``L`` layers. Per-layer maps are
``(B, H, N, N)``; fused maps and transition matrices are ``(B, N, N)``; a
readout is a ``(B, N)`` weighting of the tokens the classifier reads.

A method differs from another only in its per-head weighting (plain attention
for rollout, ``relu(A ⊙ ∂y/∂A)`` for gradient rollout); everything after
that is shared: fuse heads → discard → add residual → roll out → mask.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ..capture.fusion import Fusion, fuse_heads
from ..capture.tokens import TokenLayout
from .base import check_discard_ratio


def discard_candidates(fused: Tensor, protected: Sequence[int]) -> Tensor:
    """``(B, N²)`` flattened maps with the protected diagonal entries ``(p, p)`` set to +inf."""
    batch, n, _ = fused.shape
    candidates = fused.reshape(batch, n * n).clone()
    candidates[:, [p * n + p for p in protected]] = torch.inf
    return candidates


def discard_count(n: int, ratio: float, num_protected: int) -> int:
    """``⌊ratio·N²⌋`` entries, never the ``num_protected`` protected ones."""
    return min(int(n * n * check_discard_ratio(ratio)), n * n - num_protected)


def sorted_values(candidates: Tensor) -> Tensor:
    """Each row sorted ascending (numpy's vectorised sort on CPU, torch's elsewhere)."""
    if candidates.device.type == "cpu":
        return torch.from_numpy(np.sort(candidates.numpy(), axis=1))
    return candidates.sort(dim=1).values


def drop_lowest(fused: Tensor, candidates: Tensor, kth: Tensor, k: int) -> Tensor:
    """Zero the ``k`` smallest candidates per row, given each row's k-th smallest value ``kth`` ``(B, 1)``;
    among values equal to ``kth`` the lower flat indices go first."""
    drop = candidates <= kth
    if not bool((drop.sum(dim=1) == k).all()):  # ties at the threshold: keep only as many as fit
        below = candidates < kth
        tied = candidates == kth
        drop = below | (tied & (tied.cumsum(dim=1) <= k - below.sum(dim=1, keepdim=True)))
    return fused.masked_fill(drop.view_as(fused), 0.0)


def discard_by_ratio(fused: Tensor, ratios: Sequence[float], protected: Sequence[int] = ()) -> Iterator[Tensor]:
    """:func:`discard_lowest` for each of ``ratios``, sorting each sample's entries only once."""
    n = fused.shape[-1]
    counts = [discard_count(n, r, len(protected)) for r in ratios]
    if max(counts) <= 0:
        yield from (fused.clone() for _ in ratios)
        return
    candidates = discard_candidates(fused, protected)
    ordered = sorted_values(candidates)
    for k in counts:
        yield drop_lowest(fused, candidates, ordered[:, k - 1:k], k) if k > 0 else fused.clone()


def discard_lowest(fused: Tensor, ratio: float, protected: Sequence[int] = ()) -> Tensor:
    """Zero the ``⌊ratio·N²⌋`` smallest entries of each sample's ``(N, N)`` map.

    Each batch item is thresholded on its own; among equal values the lower flat index
    goes first. The diagonal entries ``(p, p)`` of ``protected`` tokens (CLS→CLS) are
    never zeroed.
    """
    return next(discard_by_ratio(fused, [ratio], protected))


def add_residual(fused: Tensor) -> Tensor:
    """Transition matrix ``Â = (A + I) / rowsum(A + I)``: every row sums to 1."""
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    with_residual = fused + eye
    return with_residual / with_residual.sum(dim=-1, keepdim=True)


def transitions_by_ratio(fused: Sequence[Tensor], ratios: Sequence[float], layout: TokenLayout) -> Iterator[list[Tensor]]:
    """For each ratio, per layer ``Â_l = add_residual(discard_lowest(F_l, ratio))``.

    Each layer's entries are sorted once, however many ratios follow (a sweep costs one sort per layer).
    """
    per_layer = [discard_by_ratio(f, ratios, layout.protected_tokens) for f in fused]
    for _ in ratios:
        yield [add_residual(next(discarded)) for discarded in per_layer]


def transition_matrices(fused: Sequence[Tensor], discard_ratio: float, layout: TokenLayout) -> list[Tensor]:
    """Per layer ``Â_l = add_residual(discard_lowest(F_l))`` for fused maps ``F_l``."""
    return next(transitions_by_ratio(fused, [check_discard_ratio(discard_ratio)], layout))


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


def rollout_masks_torch(fused: Sequence[Tensor], readout: Tensor, layout: TokenLayout,
                        discard_ratios: Sequence[float]) -> Tensor:
    """Masks ``(B, R, gh, gw)`` from fused per-layer maps, one per discard ratio: discard → residual → roll out.

    Plain torch on any device: the reference that the compiled kernel behind :func:`rollout_masks` equals."""
    readout = readout.float()
    masks = [to_mask(rollout_readout(t, readout), layout) for t in transitions_by_ratio(fused, discard_ratios, layout)]
    return torch.stack(masks, dim=1)


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Around a compiled parallel kernel: numba's first parallel launch in a process sets the calling thread's
    OpenMP thread count to numba's own (every core), which would change torch's for the rest of the run (and
    with it the float sums of the backward pass); torch's setting is put back."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def rollout_masks(fused: Sequence[Tensor], readout: Tensor, layout: TokenLayout, discard_ratios: Sequence[float]) -> Tensor:
    """Masks ``(B, R, gh, gw)``, one per discard ratio: :func:`rollout_masks_torch`, computed on CPU by the
    compiled kernel :func:`vitexplain.kernels.rollout.rollout_rows` (the same values), elsewhere in torch."""
    if fused[0].device.type != "cpu":
        return rollout_masks_torch(fused, readout, layout, discard_ratios)
    from ..kernels.rollout import rollout_rows

    maps = tuple(np.ascontiguousarray(f.float().numpy()) for f in fused)  # L × (B, N, N), no copy if already so
    batch, n, _ = maps[0].shape
    counts = np.array([discard_count(n, r, len(layout.protected_tokens)) for r in discard_ratios], dtype=np.int64)
    with torch_threads_kept():
        values = rollout_rows(maps, counts, layout.protected_tokens, readout.float().cpu().numpy())
    masks = to_mask(torch.from_numpy(values).reshape(batch * len(discard_ratios), n), layout)
    return masks.float().view(batch, len(discard_ratios), *layout.grid)
