"""The math of rollout and gradient rollout, on hand-computed cases and a full-matrix reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_attention
from vitexplain.capture.tokens import TokenLayout
from vitexplain.methods.rollout import attention_rollout
from vitexplain.capture.fusion import fuse_heads
from vitexplain.methods.grad_rollout import gradient_rollout
from vitexplain.methods.rollout_steps import add_residual, discard_by_ratio, discard_lowest, rollout_masks_torch, rollout_readout, to_mask
from vitexplain.kernels.rollout import layer_thresholds, select_threshold
from vitexplain.methods.rollout_steps import rollout_masks

CLS = TokenLayout(num_prefix_tokens=1, grid=(1, 2), protected_tokens=(0,))
E0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)


def test_hand_computed_three_tokens_two_layers():
    # Â = (A + I) / 2 since rows of A sum to 1.
    # Â1 = [[.75,.25,0],[0,1,0],[0,0,1]], Â2 = [[.5,0,.5],[0,1,0],[0,0,1]]
    # e0ᵀ Â2 Â1 = [.5, 0, .5] Â1 = [.375, .125, .5] → patches [.125, .5] → /max → [.25, 1]
    a1 = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    a2 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    attentions = [a1.view(1, 1, 3, 3), a2.view(1, 1, 3, 3)]
    values = rollout_readout([add_residual(a[:, 0]) for a in attentions], E0)
    torch.testing.assert_close(values, torch.tensor([[0.375, 0.125, 0.5]], dtype=torch.float64))
    mask = attention_rollout(attentions, E0, CLS, fusion="mean", discard_ratio=0.0)
    torch.testing.assert_close(mask, torch.tensor([[[0.25, 1.0]]]), rtol=0, atol=1e-7)


def test_hand_computed_fusion_and_discard():
    heads = torch.tensor([[[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]],
                          [[0.4, 0.4, 0.2], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1]]]).unsqueeze(0)
    torch.testing.assert_close(fuse_heads(heads, "max")[0], torch.tensor([[0.4, 0.4, 0.5], [0.3, 0.3, 0.8], [0.6, 0.7, 0.1]]))
    torch.testing.assert_close(fuse_heads(heads, "min")[0], torch.tensor([[0.2, 0.3, 0.2], [0.1, 0.1, 0.4], [0.2, 0.3, 0.1]]))
    torch.testing.assert_close(fuse_heads(heads, "mean")[0], torch.tensor([[0.3, 0.35, 0.35], [0.2, 0.2, 0.6], [0.4, 0.5, 0.1]]))
    # min fusion; ratio 0.5 of 9 entries → the 4 smallest besides CLS→CLS (0.2 at (0,0) is protected):
    # 0.1, 0.1, 0.1 and then the lowest 0.2 other than (0,0), which is (0,2) or (2,0) — values tie; check count + protection.
    discarded = discard_lowest(fuse_heads(heads, "min"), 0.5, protected=(0,))[0]
    assert discarded[0, 0] == pytest.approx(0.2)
    assert int((discarded == 0).sum()) == 4
    assert discarded[1, 2] == pytest.approx(0.4) and discarded[0, 1] == pytest.approx(0.3)


def test_head_mean_as_a_product_equals_the_mean_over_heads():
    maps = random_attention(3, 5, 7)  # float64
    torch.testing.assert_close(fuse_heads(maps.float(), "mean"), maps.mean(dim=1).float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(fuse_heads(maps, "mean"), maps.mean(dim=1), rtol=0, atol=1e-15)  # keeps float64
    strided = maps.transpose(-1, -2)  # not contiguous: reshaped by a copy, same result
    torch.testing.assert_close(fuse_heads(strided, "mean"), strided.mean(dim=1), rtol=0, atol=1e-15)


def test_discard_counts_and_protects_cls_even_when_smallest():
    fused = torch.arange(16, dtype=torch.float32).view(1, 4, 4)  # (0,0) holds the smallest value 0
    fused[0, 0, 0] = -1.0
    out = discard_lowest(fused, 0.5, protected=(0,))
    assert out[0, 0, 0] == -1.0
    # ⌊0.5·16⌋ = 8 smallest among the others: values 1..8 zeroed, 9..15 kept
    expected = torch.arange(16, dtype=torch.float32)
    expected[1:9] = 0
    expected[0] = -1
    torch.testing.assert_close(out.view(-1), expected)


def test_discard_is_per_sample():
    fused = random_attention(3, 1, 6)[:, 0]
    batched = discard_lowest(fused, 0.7, protected=(0,))
    for i in range(3):
        torch.testing.assert_close(batched[i], discard_lowest(fused[i:i + 1], 0.7, protected=(0,))[0])
    # the zeroed positions differ between samples (the original bug applied item 0's to all)
    assert not torch.equal(batched[0] == 0, batched[1] == 0)


def test_ties_at_the_threshold_go_to_the_lower_index():
    fused = torch.tensor([[[0.5, 0.2, 0.2], [0.2, 0.9, 0.2], [0.7, 0.1, 0.2]]])
    # ⌊0.4·9⌋ = 3 smallest besides (0,0): 0.1 at (2,1), then the first two of the five 0.2s: (0,1), (0,2)
    expected = torch.tensor([[[0.5, 0.0, 0.0], [0.2, 0.9, 0.2], [0.7, 0.0, 0.2]]])
    torch.testing.assert_close(discard_lowest(fused, 0.4, (0,)), expected, rtol=0, atol=0)


def test_one_sort_for_many_ratios_equals_each_ratio_alone():
    fused = torch.rand(3, 9, 9)
    fused[0, :4] = 0.25  # many ties, straddling thresholds
    fused[1] = torch.round(fused[1] * 4) / 4
    ratios = [0.0, 0.3, 0.5, 0.77, 0.95]
    for ratio, swept in zip(ratios, discard_by_ratio(fused, ratios, (0, 1))):
        single = discard_lowest(fused, ratio, (0, 1))
        torch.testing.assert_close(swept, single, rtol=0, atol=0)
        assert int((single[:, [0, 1], [0, 1]] == 0).sum()) == 0 or ratio == 0
        assert int((single == 0).sum(dim=(1, 2)).min()) >= min(int(81 * ratio), 79)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_discard_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        discard_lowest(torch.ones(1, 3, 3), ratio)


def test_residual_rows_are_stochastic_not_columns():
    fused = torch.tensor([[[0.0, 3.0, 1.0], [0.0, 0.0, 0.0], [2.0, 2.0, 4.0]]])
    transition = add_residual(fused)
    torch.testing.assert_close(transition.sum(-1), torch.ones(1, 3))
    torch.testing.assert_close(transition[0, 0], torch.tensor([1 / 5, 3 / 5, 1 / 5]))
    torch.testing.assert_close(transition[0, 1], torch.tensor([0.0, 1.0, 0.0]))
    assert not torch.allclose(transition.sum(-2), torch.ones(1, 3))


def reference_rollout(attentions, fusion, ratio, prefix, grid):
    """Straightforward full-matrix rollout with per-sample python discard (no shared code)."""
    batch, _, n, _ = attentions[0].shape
    masks = []
    for b in range(batch):
        result = np.eye(n)
        for layer in attentions:
            heads = layer[b].double().numpy()
            fused = {"mean": heads.mean(0), "max": heads.max(0), "min": heads.min(0)}[fusion]
            flat = fused.flatten().copy()
            order = [i for i in np.argsort(flat, kind="stable") if i != 0][: int(n * n * ratio)]
            flat[order] = 0
            a = flat.reshape(n, n) + np.eye(n)
            a = a / a.sum(axis=-1, keepdims=True)
            result = a @ result
        row = result[0, prefix:]
        masks.append((row / row.max()).reshape(grid))
    return torch.tensor(np.stack(masks))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_full_matrix_reference(fusion, ratio, seed):
    generator = torch.Generator().manual_seed(seed)
    layout = TokenLayout(num_prefix_tokens=2, grid=(3, 4), protected_tokens=(0,))
    attentions = [random_attention(3, 4, layout.num_tokens, generator) for _ in range(5)]
    readout = torch.zeros(3, layout.num_tokens, dtype=torch.float64)
    readout[:, 0] = 1
    mask = attention_rollout(attentions, readout, layout, fusion, ratio)
    torch.testing.assert_close(mask.double(), reference_rollout(attentions, fusion, ratio, 2, (3, 4)), atol=1e-6, rtol=1e-5)


def test_rollout_readout_is_row_of_full_product():
    generator = torch.Generator().manual_seed(3)
    transitions = [add_residual(random_attention(2, 1, 7, generator)[:, 0]) for _ in range(4)]
    full = torch.eye(7, dtype=torch.float64).expand(2, 7, 7)
    for t in transitions:
        full = t @ full
    readout = torch.softmax(torch.randn(2, 7, generator=generator, dtype=torch.float64), -1)
    torch.testing.assert_close(rollout_readout(transitions, readout), torch.einsum("bn,bnm->bm", readout, full))
    # the product of row-stochastic matrices is row-stochastic: a readout distribution stays one
    torch.testing.assert_close(rollout_readout(transitions, readout).sum(-1), torch.ones(2, dtype=torch.float64))


def test_batch_equals_singles():
    layout = TokenLayout(1, (2, 3), (0,))
    attentions = [random_attention(4, 3, 7) for _ in range(3)]
    gradients = [torch.randn_like(a) for a in attentions]
    readout = torch.zeros(4, 7, dtype=torch.float64)
    readout[:, 0] = 1
    batched = gradient_rollout(attentions, gradients, readout, layout, "max", 0.6)
    for i in range(4):
        single = gradient_rollout([a[i:i + 1] for a in attentions], [g[i:i + 1] for g in gradients],
                                  readout[i:i + 1], layout, "max", 0.6)
        torch.testing.assert_close(batched[i:i + 1], single)


def test_gradient_rollout_fuses_heads_before_removing_negatives():
    # one layer, two heads; A ⊙ G in row 0 (the CLS row): head 0 [0, -1, +1], head 1 [0, +1, -3] (A = 1/3 everywhere)
    layout = TokenLayout(1, (1, 2), (0,))
    attention = torch.full((1, 2, 3, 3), 1 / 3, dtype=torch.float64)
    gradient = torch.zeros_like(attention)
    gradient[0, 0, 0, 1], gradient[0, 0, 0, 2] = -3.0, 3.0
    gradient[0, 1, 0, 1], gradient[0, 1, 0, 2] = 3.0, -9.0
    mask = gradient_rollout([attention], [gradient], E0.clone(), layout, "mean", 0.0)
    # mean over heads first: row 0 = [0, 0, -1] → relu → [0, 0, 0]; + I → [1, 0, 0]: no patch gets anything
    torch.testing.assert_close(mask, torch.tensor([[[0.0, 0.0]]]))
    mask = gradient_rollout([attention], [gradient], E0.clone(), layout, "max", 0.0)
    # max over heads: row 0 = [0, 1, 1] → + I → [1, 1, 1] / 3 → patches [1/3, 1/3] → [1, 1]
    torch.testing.assert_close(mask, torch.tensor([[[1.0, 1.0]]]))
    # removing negatives per head first (Chefer's rule) would give mean [0, 0.5, 0.5] → patches [1, 1] instead
    per_head = attention * gradient
    assert torch.equal(per_head.clamp_min(0).mean(1)[0, 0], torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))


def reference_gradient_rollout(attentions, gradients, fusion, ratio, prefix, grid):
    """The original order, written out: ``(attention * grad).mean(axis=1)`` (or max/min), then negatives set
    to 0, then discard, residual and the full-matrix product (no shared code)."""
    batch, _, n, _ = attentions[0].shape
    masks = []
    for b in range(batch):
        result = np.eye(n)
        for attention, gradient in zip(attentions, gradients):
            weighted = attention[b].double().numpy() * gradient[b].double().numpy()
            fused = {"mean": weighted.mean(0), "max": weighted.max(0), "min": weighted.min(0)}[fusion]
            fused[fused < 0] = 0
            flat = fused.flatten().copy()
            order = [i for i in np.argsort(flat, kind="stable") if i != 0][: int(n * n * ratio)]
            flat[order] = 0
            a = flat.reshape(n, n) + np.eye(n)
            result = (a / a.sum(axis=-1, keepdims=True)) @ result
        row = result[0, prefix:]
        masks.append((row / row.max()).reshape(grid))
    return torch.tensor(np.stack(masks))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("ratio", [0.0, 0.9])
def test_gradient_rollout_equals_the_original_order_written_out(fusion, ratio):
    generator = torch.Generator().manual_seed(7)
    layout = TokenLayout(num_prefix_tokens=1, grid=(3, 3), protected_tokens=(0,))
    attentions = [random_attention(2, 3, layout.num_tokens, generator) for _ in range(4)]
    gradients = [torch.randn(a.shape, generator=generator, dtype=torch.float64) for a in attentions]
    readout = torch.zeros(2, layout.num_tokens, dtype=torch.float64)
    readout[:, 0] = 1
    mask = gradient_rollout(attentions, gradients, readout, layout, fusion, ratio)
    torch.testing.assert_close(mask.double(), reference_gradient_rollout(attentions, gradients, fusion, ratio, 1, (3, 3)),
                               atol=1e-5, rtol=1e-4)


def test_gradient_rollout_with_unit_gradients_equals_rollout():
    layout = TokenLayout(1, (2, 2), (0,))
    attentions = [random_attention(2, 3, 5) for _ in range(3)]
    readout = torch.zeros(2, 5, dtype=torch.float64)
    readout[:, 0] = 1
    ones = [torch.ones_like(a) for a in attentions]
    torch.testing.assert_close(gradient_rollout(attentions, ones, readout, layout, "min", 0.3),
                               attention_rollout(attentions, readout, layout, "min", 0.3))


def test_mask_is_scaled_to_max_one_and_shaped_as_grid():
    layout = TokenLayout(3, (2, 5), ())
    values = torch.rand(4, 13)
    mask = to_mask(values, layout)
    assert mask.shape == (4, 2, 5)
    torch.testing.assert_close(mask.amax(dim=(1, 2)), torch.ones(4))
    torch.testing.assert_close(mask[1].flatten(), values[1, 3:] / values[1, 3:].max())


def test_unknown_fusion_is_rejected():
    with pytest.raises(ValueError, match="mean, max, min"):
        fuse_heads(torch.ones(1, 2, 3, 3), "median")


@pytest.mark.parametrize("ratios", [(0.0, 0.1, 0.35, 0.5, 0.8, 0.95, 0.99), (0.0,), (0.5,), (0.95,)])
@pytest.mark.parametrize("protected", [(), (0,), (0, 1)])
@pytest.mark.parametrize("sparse_readout", [False, True], ids=["dense-readout", "readout-with-zeros"])
def test_compiled_kernel_equals_torch_rollout_including_ties(protected, ratios, sparse_readout):
    """Several ratios (one sort per layer) and single ratios (a selection), ties and protected entries included;
    readouts with zeros (rows the kernel skips, unless ties are still to be dropped in row order) too."""
    generator = torch.Generator().manual_seed(7)
    layout = TokenLayout(num_prefix_tokens=2, grid=(3, 3), protected_tokens=protected)
    fused = [random_attention(3, 1, 11, generator)[:, 0].float() for _ in range(4)]
    fused[1] = torch.round(fused[1] * 8) / 8  # heavy ties at every threshold
    fused[2][0, 0, 0] = fused[2][0].min()  # a protected entry that would otherwise be discarded
    readout = torch.softmax(torch.randn(3, 11, generator=generator), dim=-1)
    if sparse_readout:  # the last layer (rolled first) with ties in rows whose readout weight is 0
        fused[3] = torch.round(fused[3] * 8) / 8
        readout[0] = torch.nn.functional.one_hot(torch.tensor(0), 11).float()  # token pooling
        readout[1, ::2] = 0.0
        readout[2, :5] = 0.0
    torch.testing.assert_close(rollout_masks(fused, readout, layout, ratios),
                               rollout_masks_torch(fused, readout, layout, ratios), rtol=1e-5, atol=1e-6)


def test_all_counts_of_a_map_at_once_equal_one_by_one_on_real_sized_maps():
    """20 counts in any order, repeated ones among them, on 197×197 softmax maps: the thresholds and ties
    of :func:`layer_thresholds` (every count at once) equal the plain sort's, count by count."""
    rng = np.random.default_rng(5)
    n = 197
    logits = rng.normal(scale=3.0, size=(3, 2, n, n)).astype(np.float32)
    maps = tuple(np.exp(x) / np.exp(x).sum(-1, keepdims=True) for x in logits)  # L=3 × (B=2, N, N)
    maps[1][0, 5, :] = maps[1][0, 5, 0]  # a row of ties
    counts = np.array([int(n * n * r) for r in np.linspace(0, 0.95, 20)] + [7000, 1, n * n - 1])
    counts = rng.permutation(np.concatenate([counts, counts[[3, 11]]]))
    thresholds, ties = layer_thresholds(maps, counts, (0,))
    for b in range(2):
        for layer in range(3):
            for r, k in enumerate(counts):
                expected = reference_thresholds(maps[layer][b], k, (0,)) if k > 0 else (-np.inf, 0)
                assert (thresholds[b, layer, r], ties[b, layer, r]) == expected


def reference_thresholds(matrix: np.ndarray, k: int, protected: tuple[int, ...]) -> tuple[float, int]:
    """The k-th smallest entry (k ≥ 1; protected diagonal entries as +inf) and how many of its equals are discarded."""
    n = matrix.shape[0]
    values = matrix.astype(np.float64).ravel()
    values[[p * n + p for p in protected]] = np.inf
    t = np.sort(values)[k - 1]
    return t, k - int((values < t).sum())


@pytest.mark.parametrize("protected", [(), (0,), (0, 1)])
def test_radix_selection_equals_sorting_on_awkward_values(protected):
    """The compiled radix selection, for one count and for several at once, against a plain sort: values that
    share all but their last bits, negatives, −0 next to +0, all-equal maps, k = 1 and k = every entry."""
    rng = np.random.default_rng(3)
    n = 7
    base = np.float32(0.3)
    near = base + np.arange(n * n, dtype=np.float32).reshape(n, n) * np.spacing(base)  # differ in the last 8 bits only
    signed = rng.normal(size=(n, n)).astype(np.float32)
    signed[0, 3], signed[2, 2], signed[4, 1] = -0.0, 0.0, -0.0
    layers = (near[::-1].copy(), signed, np.full((n, n), 0.125, np.float32), rng.random((n, n)).astype(np.float32))
    maps = tuple(np.stack([layer, layer.T.copy()]) for layer in layers)  # L × (B=2, N, N)
    largest = n * n - len(protected)
    negatives = int((signed < 0).sum())  # ranks negatives + 1 … + 3 are the three zeros, whatever their sign
    is_protected = np.isin(np.arange(n), protected)
    keys, lanes = np.empty(n * n, dtype=np.uint32), np.empty((4, 4096), dtype=np.int32)
    for k in (1, 2, 17, negatives + 1, negatives + 2, negatives + 3, largest - 1, largest):
        several = layer_thresholds(maps, np.array([k, 0, largest]), protected)  # every count of a map at once
        for b in range(2):
            for layer in range(len(maps)):
                expected = reference_thresholds(maps[layer][b], k, protected)
                assert select_threshold(maps[layer][b], is_protected, k, keys, lanes) == expected  # one count: radix selection
                assert (several[0][b, layer, 0], several[1][b, layer, 0]) == expected
                assert (several[0][b, layer, 1], several[1][b, layer, 1]) == (-np.inf, 0)
