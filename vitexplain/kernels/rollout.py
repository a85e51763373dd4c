"""Rollout on CPU, compiled: per-layer thresholds, then the readout row updated layer by layer.

For ratio ``r`` the discarded entries of a layer are its ``k_r = ⌊r·N²⌋`` smallest
(per sample; ties by flat index; protected diagonal entries never), i.e. the
entries below the k-th smallest value ``t_r`` plus the first few equal to it.
One ratio: a linear-time radix selection finds ``t_r`` just before the layer's
rollout step (the map is read from memory once); several ratios: one sort per
layer gives every ``t_r``. The readout row is then updated without ever forming ``Â``:

    v'_j = Σ_i u_i (F_ij [kept_ij] + δ_ij),   u_i = v_i / (1 + Σ_j F_ij [kept_ij]),

two dense, vectorisable passes over each row per ratio, in parallel over
(image, ratio). A leaf below the plain torch reference,
:func:`vitexplain.methods.rollout_steps.rollout_masks_torch`, which it equals (tested, ties included);
:func:`vitexplain.methods.rollout_steps.rollout_masks` uses it for CPU tensors.
"""
from __future__ import annotations

from typing import Sequence

import numba
import numpy as np

FAST = {"reassoc", "contract", "nsz", "arcp"}  # no 'ninf': thresholds may be -inf


def layer_thresholds(maps: tuple[np.ndarray, ...], counts: np.ndarray, protected: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per image, layer and count ``k``: the threshold ``t`` (the k-th smallest entry of the layer's
    ``(N, N)`` map, protected diagonal entries excluded; −inf for k = 0) and how many entries equal to ``t``
    are discarded (the first ones in flat order). ``maps`` is ``L × (B, N, N)``; results are ``(B, L, R)``.
    Every count of a map at once (:func:`select_thresholds`), in parallel over images and layers."""
    n = maps[0].shape[-1]
    is_protected = np.zeros(n, dtype=np.bool_)
    is_protected[list(protected)] = True
    order = np.argsort(counts, kind="stable")
    thresholds, ties = _layer_thresholds(maps, np.ascontiguousarray(np.asarray(counts, np.int64)[order]), is_protected)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return thresholds[:, :, inverse], ties[:, :, inverse]


@numba.njit(parallel=True, cache=True)
def _layer_thresholds(maps, ascending_counts, protected):
    """``(B, L, R)`` thresholds and ties of maps ``L × (B, N, N)``, one (image, layer) per parallel item."""
    batch, n, _ = maps[0].shape
    layers, ratios = len(maps), ascending_counts.size
    thresholds = np.empty((batch, layers, ratios), dtype=np.float32)
    ties = np.empty((batch, layers, ratios), dtype=np.int64)
    for item in numba.prange(batch * layers):
        b, layer = item // layers, item % layers
        keys, spread = np.empty(n * n, dtype=np.uint32), np.empty(n * n + 1, dtype=np.uint32)
        bin_keys, lanes = np.empty(n * n, dtype=np.uint32), np.empty((4, 1 << 12), dtype=np.int32)
        cursors = np.empty((5, 1 << 12), dtype=np.int32)
        select_thresholds(maps[layer][b], protected, ascending_counts, keys, lanes, cursors, spread, bin_keys,
                          thresholds[b, layer], ties[b, layer])
    return thresholds, ties


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
def select_threshold(matrix, protected, k, keys, lanes):
    """The k-th smallest (k ≥ 1) entry ``t`` of a float32 ``(N, N)`` map, protected diagonal entries
    ranking as +inf, and how many of the ties equal to ``t`` are discarded (``k`` minus the entries
    below ``t``). ``keys`` (``N²`` uint32) and ``lanes`` (``(4, 4096)`` int32) are scratch space, reused
    from layer to layer.

    Radix selection on order keys, digits of 12, 10 and 10 bits: each pass histograms the remaining
    candidates, finds the digit that holds rank k and keeps only the candidates with that digit."""
    total = _first_digit_histogram(matrix, protected, keys, lanes)
    digit, below = _digit_of_rank(lanes[0], k, 0, 0)
    remaining = _keep_digit(keys, total, 20, 12, digit)
    return _refined(keys, remaining, k, below, np.uint32(digit) << 20, lanes[1])


@numba.njit(cache=True)
def select_thresholds(matrix, protected, counts, keys, lanes, cursors, spread, bin_keys, thresholds, ties):
    """:func:`select_threshold` for every one of ``counts`` (ascending; 0 gives −inf and no ties) into
    ``thresholds`` and ``ties``. The key pass and the first digit's histogram serve all counts; one pass then
    spreads the keys of the bins that hold a count's rank into ``spread`` (``N² + 1``), and each count
    refines only its own bin (a few per cent of the map): in place, or in a copy in ``bin_keys`` (``N²``)
    where the next count's rank lies in the same bin. ``cursors`` (``(5, 4096)`` int32) is scratch."""
    total = _first_digit_histogram(matrix, protected, keys, lanes)
    histogram = lanes[0]
    digits, belows = np.full(counts.size, -1, np.int64), np.zeros(counts.size, np.int64)
    digit, below = 0, 0
    for r in range(counts.size):
        if counts[r] > 0:
            digit, below = _digit_of_rank(histogram, counts[r], digit, below)
            digits[r], belows[r] = digit, below
    starts = _spread_bins(keys, total, lanes, digits, cursors, spread)
    for r in range(counts.size):
        if counts[r] == 0:
            thresholds[r], ties[r] = -np.inf, 0
            continue
        size, first = histogram[digits[r]], starts[r]
        shared = r + 1 < counts.size and digits[r + 1] == digits[r]  # refining reorders the bin: copy it first
        candidates = bin_keys if shared else spread[first:first + size]
        if shared:
            bin_keys[:size] = spread[first:first + size]
        thresholds[r], ties[r] = _refined(candidates, size, counts[r], belows[r], np.uint32(digits[r]) << 20, lanes[1])


@numba.njit(cache=True)
def _spread_bins(keys, total, lanes, digits, cursors, spread):
    """Copy the keys of the first-digit bins ``digits`` (ascending, repeats allowed, −1 skipped) into
    consecutive regions of ``spread``, bin after bin; returns each entry's region start. Keys go four at a
    time, each into its own part of its bin's region (sized by :func:`_first_digit_histogram`'s per-lane
    counts, still in ``lanes[1:]``), so that keys of one bin do not all wait on one cursor; keys of other
    bins all land on ``spread[total]``, which nothing reads."""
    step = cursors[4]
    step[:] = 0
    cursors[:4] = total
    starts = np.zeros(digits.size, np.int64)
    start = 0
    for r in range(digits.size):
        digit = digits[r]
        if digit < 0:
            continue
        if step[digit] == 0:
            step[digit] = 1
            cursors[0, digit] = start
            cursors[1, digit] = start + lanes[0, digit] - lanes[1, digit] - lanes[2, digit] - lanes[3, digit]
            cursors[2, digit] = cursors[1, digit] + lanes[1, digit]
            cursors[3, digit] = cursors[2, digit] + lanes[2, digit]
            start += lanes[0, digit]
        starts[r] = cursors[0, digit]
    whole = total - total % 4
    for index in range(0, whole, 4):
        for lane in range(4):
            key = keys[index + lane]
            digit = key >> 20
            spread[cursors[lane, digit]] = key
            cursors[lane, digit] += step[digit]
    for index in range(whole, total):  # counted in lane 0
        key = keys[index]
        spread[cursors[0, key >> 20]] = key
        cursors[0, key >> 20] += step[key >> 20]
    return starts


@numba.njit(cache=True)
def _first_digit_histogram(matrix, protected, keys, lanes):
    """Fill ``keys`` with the map's order keys (protected diagonal entries: +inf) and ``lanes[0]`` with the
    histogram of their first 12 bits; returns the number of keys. The histogram counts into four interleaved
    copies first: attention values crowd into few bins, and one copy would make every increment wait for
    the previous one."""
    n = matrix.shape[0]
    total = n * n
    flat = matrix.reshape(total)
    for index in range(total):
        keys[index] = _order_key(flat[index])
    for p in range(n):
        if protected[p]:
            keys[p * n + p] = INF_KEY
    lanes[:] = 0
    whole = total - total % 4
    for index in range(0, whole, 4):
        lanes[0, keys[index] >> 20] += 1
        lanes[1, keys[index + 1] >> 20] += 1
        lanes[2, keys[index + 2] >> 20] += 1
        lanes[3, keys[index + 3] >> 20] += 1
    for index in range(whole, total):
        lanes[0, keys[index] >> 20] += 1
    histogram = lanes[0]
    for digit in range(1 << 12):
        histogram[digit] += lanes[1, digit] + lanes[2, digit] + lanes[3, digit]
    return total


@numba.njit(cache=True)
def _digit_of_rank(histogram, k, digit, below):
    """The digit whose bin holds rank ``k`` and the count in the bins before it, scanning on from ``digit``
    with ``below`` entries before it (ranks in ascending order need one scan in all)."""
    while below + histogram[digit] < k:
        below += histogram[digit]
        digit += 1
    return digit, below


@numba.njit(cache=True)
def _keep_digit(keys, count, shift, width, digit):
    """Compact to the front of ``keys`` the first ``count`` keys whose ``width``-bit digit at ``shift`` is
    ``digit``; returns how many."""
    kept = 0
    for c in range(count):
        if (keys[c] >> shift) & ((1 << width) - 1) == digit:
            keys[kept] = keys[c]
            kept += 1
    return kept


@numba.njit(cache=True)
def _refined(keys, remaining, k, below, prefix, histogram):
    """Rank ``k``'s entry and ties among ``keys[:remaining]``, which share the first 12 bits ``prefix`` and
    have ``below`` entries of the map under them: two more digits of 10 bits (a bin holds a few per cent of
    the map, and small histograms are cleared and scanned quickly)."""
    for shift in (10, 0):
        histogram[:1 << 10] = 0
        for c in range(remaining):
            histogram[(keys[c] >> shift) & 0x3FF] += 1
        digit, below = _digit_of_rank(histogram, k, 0, below)
        prefix |= np.uint32(digit) << shift
        remaining = _keep_digit(keys, remaining, shift, 10, digit)
    return _from_key(prefix), k - below


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
def _kept_sum(row, t):
    """Sum of the row's entries above ``t`` and how many equal it."""
    total, ties = np.float32(0.0), 0
    for j in range(row.shape[0]):
        x = row[j]
        total += x if x > t else np.float32(0.0)
        ties += x == t
    return total, ties


@numba.njit(cache=True, fastmath=FAST)
def _roll_layer(matrix, t, ties_dropped, protected, v):
    """One rollout step ``vᵀ Â`` through a layer's ``(N, N)`` map with threshold ``t``. A row without an
    entry equal to ``t`` (almost all) takes two passes and no buffer: its kept sum, then its share of ``vᵀ Â``
    with the entries above ``t`` selected again; a row with ties writes its kept entries out first. Rows
    whose ``v_i`` is 0 are skipped (once no tie is left to be dropped: ties are dropped in row order)."""
    n = v.shape[0]
    kept = np.empty(n, dtype=np.float32)
    new = np.zeros(n, dtype=np.float32)
    room = ties_dropped
    for i in range(n):
        row = matrix[i]
        if v[i] == 0 and room == 0:  # adds nothing (e.g. every row but the class token's in the last layer
            continue                 # of a token-pooled model)
        total, ties = _kept_sum(row, t)
        saved = protected[i] and row[i] <= t  # CLS→CLS is never discarded (and is no tie)
        if saved:
            total += row[i]
            ties -= row[i] == t
        if ties:
            room -= _kept_row(row, t, i, protected, room, kept)
            u = v[i] / (np.float32(1.0) + kept.sum())
            for j in range(n):
                new[j] += u * kept[j]
        else:
            u = v[i] / (np.float32(1.0) + total)
            for j in range(n):
                x = row[j]
                new[j] += u * (x if x > t else np.float32(0.0))
            if saved:
                new[i] += u * row[i]
        new[i] += u
    return new


@numba.njit(parallel=True, cache=True)
def _roll(maps, thresholds, ties_dropped, protected, readout):
    """Readout rows ``(B, R, N)`` from maps ``L × (B, N, N)``, thresholds and ties ``(B, L, R)``."""
    batch, _, n = maps[0].shape
    ratios = thresholds.shape[2]
    out = np.empty((batch, ratios, n), dtype=np.float32)
    for br in numba.prange(batch * ratios):
        b, r = br // ratios, br % ratios
        v = readout[b].copy()
        for layer in range(len(maps) - 1, -1, -1):
            v = _roll_layer(maps[layer][b], thresholds[b, layer, r], ties_dropped[b, layer, r], protected, v)
        out[b, r] = v
    return out


@numba.njit(parallel=True, cache=True)
def _roll_selecting(maps, count, protected, readout):
    """Readout rows ``(B, 1, N)`` for one discard count: each layer's threshold is selected just before
    its rollout step, while the layer's map is still in cache."""
    batch, _, n = maps[0].shape
    out = np.empty((batch, 1, n), dtype=np.float32)
    for b in numba.prange(batch):
        keys, lanes = np.empty(n * n, dtype=np.uint32), np.empty((4, 1 << 12), dtype=np.int32)
        v = readout[b].copy()
        for layer in range(len(maps) - 1, -1, -1):
            t, ties = np.float32(-np.inf), 0
            if count > 0:
                t, ties = select_threshold(maps[layer][b], protected, count, keys, lanes)
            v = _roll_layer(maps[layer][b], t, ties, protected, v)
        out[b, 0] = v
    return out


def rollout_rows(maps: tuple[np.ndarray, ...], counts: np.ndarray, protected: Sequence[int],
                 readout: np.ndarray) -> np.ndarray:
    """Readout rows ``(B, R, N)`` after rolling out fused maps ``L × (B, N, N)`` (float32, C-contiguous)
    with each layer's ``counts[r]`` smallest entries discarded (protected diagonal entries never):
    ``rᵀ Â_L ⋯ Â_1`` for each count, unscaled. ``readout`` is ``(B, N)`` float32."""
    n = maps[0].shape[-1]
    is_protected = np.zeros(n, dtype=np.bool_)
    is_protected[list(protected)] = True
    if len(counts) == 1:
        return _roll_selecting(maps, int(counts[0]), is_protected, readout)
    return _roll(maps, *layer_thresholds(maps, counts, protected), is_protected, readout)
