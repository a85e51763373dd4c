"""Rollout on CPU for any number of discard ratios: one sort per layer, then a fused, compiled readout update.

For ratio ``r`` the discarded entries of a layer are its ``k_r = ⌊r·N²⌋`` smallest
(per sample; ties by flat index; protected diagonal entries never), i.e. the
entries below the k-th smallest value ``t_r`` plus the first few equal to it.
One sort per layer gives every ``t_r``. The readout row is then updated without
ever forming ``Â``:

    v'_j = Σ_i u_i (F_ij [kept_ij] + δ_ij),   u_i = v_i / (1 + Σ_j F_ij [kept_ij]),

two dense, vectorisable passes over each row per ratio, in parallel over
(image, ratio). The result equals :func:`vitexplain.methods.base.rollout_masks`
(tested, ties included); on CPU it is ~10× faster for one ratio, and it is what makes
a 20-ratio sweep cheap.
"""
from __future__ import annotations

from typing import Sequence

import numba
import numpy as np
import torch
from torch import Tensor

from .base import TokenLayout, discard_count, rollout_masks_torch, to_mask

FAST = {"reassoc", "contract", "nsz", "arcp"}  # no 'ninf': thresholds may be -inf


def layer_thresholds(maps: tuple[np.ndarray, ...], counts: np.ndarray, protected: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per image, layer and count ``k``: the threshold ``t`` (the k-th smallest entry of the layer's
    ``(N, N)`` map, protected diagonal entries excluded; −inf for k = 0) and how many entries equal to ``t``
    are discarded (the first ones in flat order). ``maps`` is ``L × (B, N, N)`` float32; results are ``(B, L, R)``.

    One count: a compiled radix selection reading the maps in place; several: one sort of a copy serves them all."""
    batch, n, _ = maps[0].shape
    is_protected = np.zeros(n, dtype=np.bool_)
    is_protected[list(protected)] = True
    if len({int(k) for k in counts if k > 0}) <= 1:
        thresholds, ties = _radix_thresholds(maps, counts, is_protected)
        return thresholds, ties
    rows = np.stack(maps, axis=1).reshape(batch * len(maps), n * n)  # a copy: sorting reorders it
    rows[:, [p * n + p for p in protected]] = np.inf
    rows.sort(axis=1)
    thresholds = np.where(counts > 0, rows[:, np.maximum(counts - 1, 0)], -np.inf).astype(rows.dtype)
    ties = np.where(counts > 0, counts - _count_below_sorted(rows, thresholds), 0)
    return thresholds.reshape(batch, len(maps), -1), ties.reshape(batch, len(maps), -1)


@numba.njit(parallel=True, cache=True)
def _count_below_sorted(rows, thresholds):
    """``(M, R)`` counts of the entries of each sorted row below each of its thresholds."""
    counts = np.zeros(thresholds.shape, dtype=np.int64)
    for m in numba.prange(rows.shape[0]):
        for r in range(thresholds.shape[1]):
            counts[m, r] = np.searchsorted(rows[m], thresholds[m, r])
    return counts


SIGN = np.uint32(0x80000000)
INF_KEY = np.uint32(0xFF800000)  # the key of +inf: protected entries rank above every finite value


@numba.njit(cache=True, inline="always")
def _order_key(x):
    """A uint32 that orders as the float32 ``x`` does (−0 and +0 share one key)."""
    bits = np.float32(x + np.float32(0.0)).view(np.uint32)  # x + 0 turns −0 into +0
    return ~bits if bits & SIGN else bits | SIGN


@numba.njit(cache=True)
def _from_key(key):
    bits = key & ~SIGN if key & SIGN else ~key
    return np.uint32(bits).view(np.float32)


@numba.njit(cache=True)
def _select_in_row(matrix, protected, k, keys):
    """The k-th smallest (k ≥ 1) entry of ``matrix`` ``(N, N)`` (protected diagonal entries as +inf) and
    how many entries lie below it. Radix selection on order keys, 12 + 12 + 8 bits: each pass histograms
    the remaining candidates, finds the digit holding rank k and keeps only the candidates with it."""
    n = matrix.shape[0]
    for i in range(n):
        for j in range(n):
            keys[i * n + j] = INF_KEY if protected[i] and i == j else _order_key(matrix[i, j])
    remaining, below, prefix = n * n, 0, np.uint32(0)
    for shift, width in ((20, 12), (8, 12), (0, 8)):
        mask = np.uint32((1 << width) - 1)
        histogram = np.zeros(1 << width, dtype=np.int64)
        for c in range(remaining):
            histogram[(keys[c] >> shift) & mask] += 1
        digit = 0
        while below + histogram[digit] < k:
            below += histogram[digit]
            digit += 1
        kept = 0
        for c in range(remaining):
            if (keys[c] >> shift) & mask == digit:
                keys[kept] = keys[c]
                kept += 1
        remaining = kept
        prefix |= np.uint32(digit) << shift
    return _from_key(prefix), below


@numba.njit(parallel=True, cache=True)
def _radix_thresholds(maps, counts, protected):
    """``layer_thresholds`` for one distinct positive count, without copying the maps: ``(B, L, R)``."""
    batch, n, _ = maps[0].shape
    layers, ratios = len(maps), counts.shape[0]
    thresholds = np.full((batch, layers, ratios), -np.inf, dtype=np.float32)
    ties = np.zeros((batch, layers, ratios), dtype=np.int64)
    k = counts.max()
    if k == 0:
        return thresholds, ties
    for bl in numba.prange(batch * layers):
        b, layer = bl // layers, bl % layers
        keys = np.empty(n * n, dtype=np.uint32)
        t, below = _select_in_row(maps[layer][b], protected, k, keys)
        for r in range(ratios):
            if counts[r] > 0:
                thresholds[b, layer, r] = t
                ties[b, layer, r] = k - below
    return thresholds, ties


@numba.njit(cache=True, fastmath=FAST)
def _kept_row(row, t, i, protected, ties_to_drop, kept):
    """Fill ``kept`` with the row's entries that survive (0 where discarded); returns ties consumed."""
    n = row.shape[0]
    ties = 0
    for j in range(n):
        x = row[j]
        kept[j] = x if x > t else 0.0
        ties += x == t
    if protected[i] and row[i] <= t:  # CLS→CLS is never discarded (and is no tie)
        kept[i] = row[i]
        ties -= row[i] == t
    if ties == 0:
        return 0
    dropped = min(ties_to_drop, ties)
    seen = 0
    for j in range(n):  # ties: the lower column indices are discarded first
        if row[j] == t and not (protected[i] and j == i):
            if seen >= dropped:
                kept[j] = t
            seen += 1
    return dropped


@numba.njit(cache=True, fastmath=FAST)
def _roll_one(maps, b, thresholds, ties_dropped, protected, v):
    """Readout row of image ``b`` for one ratio: ``v ← vᵀ Â_l`` from the last layer to the first."""
    n = v.shape[0]
    kept = np.empty(n)
    for layer in range(len(maps) - 1, -1, -1):
        t = thresholds[layer]
        room = ties_dropped[layer]
        new = np.zeros(n)
        for i in range(n):
            room -= _kept_row(maps[layer][b, i], t, i, protected, room, kept)
            u = v[i] / (1.0 + kept.sum())
            new[i] += u
            for j in range(n):
                new[j] += u * kept[j]
        v = new
    return v


@numba.njit(parallel=True, cache=True)
def _roll(maps, thresholds, ties_dropped, protected, readout):
    """Readout rows ``(B, R, N)`` from maps ``L × (B, N, N)``, thresholds and ties ``(B, L, R)``."""
    batch, _, n = maps[0].shape
    ratios = thresholds.shape[2]
    out = np.empty((batch, ratios, n))
    for br in numba.prange(batch * ratios):
        b = br // ratios
        r = br % ratios
        out[b, r] = _roll_one(maps, b, thresholds[b, :, r], ties_dropped[b, :, r], protected, readout[b].copy())
    return out


def rollout_masks_by_ratio(fused: Sequence[Tensor], readout: Tensor, layout: TokenLayout,
                           discard_ratios: Sequence[float]) -> Tensor:
    """Masks ``(B, R, gh, gw)``, one per discard ratio, from fused maps ``L × (B, N, N)`` (CPU tensors)."""
    maps = tuple(np.ascontiguousarray(f.float().numpy()) for f in fused)  # L × (B, N, N), no copy if already so
    batch, n, _ = maps[0].shape
    counts = np.array([discard_count(n, r, len(layout.protected_tokens)) for r in discard_ratios], dtype=np.int64)
    thresholds, ties = layer_thresholds(maps, counts, layout.protected_tokens)
    protected = np.zeros(n, dtype=np.bool_)
    protected[list(layout.protected_tokens)] = True
    values = _roll(maps, thresholds, ties, protected, readout.double().cpu().numpy())
    masks = to_mask(torch.from_numpy(values).reshape(batch * len(discard_ratios), n), layout)
    return masks.float().view(batch, len(discard_ratios), *layout.grid)


def rollout_masks(fused: Sequence[Tensor], readout: Tensor, layout: TokenLayout, discard_ratios: Sequence[float]) -> Tensor:
    """Masks ``(B, R, gh, gw)``, one per discard ratio: the compiled kernel on CPU, torch elsewhere."""
    if fused[0].device.type == "cpu":
        return rollout_masks_by_ratio(fused, readout, layout, discard_ratios)
    return rollout_masks_torch(fused, readout, layout, discard_ratios)
