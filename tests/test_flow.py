"""Attention Flow: the compiled exact solver against networkx, closed forms, bounds, the explainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BOTH_IMAGE, DEIT_WEIGHTS, needs_shared, random_attention
from vitexplain import AttentionFlow, capture_attention, load_model, preprocessing_for
from vitexplain.io.inputs import load_rgb
from vitexplain.io.preprocess import to_model_input
from vitexplain.capture.tokens import TokenLayout
from vitexplain.methods.rollout_steps import add_residual, discard_lowest, fuse_layers, transition_matrices
from vitexplain.methods.flow import attention_flow, check_solver, flow_values
from vitexplain.kernels.maxflow import build_layered_graph


def random_transitions(layers: int, n: int, ratio: float, seed: int) -> np.ndarray:
    fused = random_attention(layers, 1, n, torch.Generator().manual_seed(seed))[:, 0]
    return add_residual(discard_lowest(fused, ratio, (0,))).numpy()


def cls_readout(n: int) -> np.ndarray:
    readout = np.zeros(n)
    readout[0] = 1.0
    return readout


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.0, 0.6])
def test_dinic_equals_networkx_on_random_attention(layers, seed, ratio):
    n = 7
    transitions = random_transitions(layers, n, ratio, seed)
    readouts = [cls_readout(n), np.r_[0.5, 0.5, np.zeros(n - 2)], np.r_[0.0, np.full(n - 1, 1 / (n - 1))]]
    for readout in readouts:  # CLS, CLS + distillation token, average pooling
        exact = flow_values(transitions, readout, range(n), "dinic")
        reference = flow_values(transitions, readout, range(n), "networkx")
        np.testing.assert_allclose(exact, reference, rtol=0, atol=1e-6)


def test_one_layer_flow_is_the_attention_row():
    transitions = random_transitions(1, 6, 0.0, seed=4)
    np.testing.assert_allclose(flow_values(transitions, cls_readout(6), range(6)), transitions[0][0], atol=1e-12)


@pytest.mark.parametrize("seed", [0, 5])
def test_two_layer_flow_is_sum_of_path_minima(seed):
    transitions = random_transitions(2, 6, 0.3, seed)
    first, second = transitions
    expected = [sum(min(second[0, k], first[k, j]) for k in range(6)) for j in range(6)]
    np.testing.assert_allclose(flow_values(transitions, cls_readout(6), range(6)), expected, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_flow_never_exceeds_one_or_the_in_capacity(seed):
    transitions = random_transitions(4, 9, 0.5, seed)
    values = flow_values(transitions, cls_readout(9), range(9))
    in_capacity = transitions[0].sum(axis=0)
    assert np.all(values <= np.minimum(1.0, in_capacity) + 1e-12)
    assert np.all(values >= 0)


def test_sink_without_incoming_attention_gets_zero_flow():
    transitions = random_transitions(3, 5, 0.0, seed=1)
    transitions[0][:, 3] = 0.0
    transitions[0] /= transitions[0].sum(axis=1, keepdims=True)
    assert flow_values(transitions, cls_readout(5), [3], "dinic")[0] == 0.0
    assert flow_values(transitions, cls_readout(5), [3], "networkx")[0] == 0.0


def test_graph_arcs_pair_with_their_reverses():
    graph = build_layered_graph(random_transitions(3, 5, 0.5, 0), cls_readout(5))
    assert np.array_equal(graph.reverse[graph.reverse], np.arange(len(graph.head)))
    assert np.array_equal(graph.head[graph.reverse], graph.tail)
    assert np.all(np.diff(graph.tail) >= 0) and graph.start[-1] == len(graph.head)


@needs_shared
def test_dinic_equals_networkx_on_real_captured_attention():
    model = load_model("deit_tiny_patch16_224", checkpoint=DEIT_WEIGHTS)
    image = to_model_input(load_rgb(BOTH_IMAGE), preprocessing_for(model))[None]
    capture = capture_attention(model, image)
    transitions = transition_matrices(fuse_layers(capture.attentions, "mean"), 0.9, capture.layout)
    stacked = torch.stack([t[0].double() for t in transitions]).numpy()
    readout = capture.readout[0].double().numpy()
    sinks = [1, 50, 100, 196]  # networkx takes seconds per sink on this 197-token, 12-layer graph
    np.testing.assert_allclose(flow_values(stacked, readout, sinks, "dinic"),
                               flow_values(stacked, readout, sinks, "networkx"), rtol=0, atol=1e-6)


@needs_shared
def test_flow_on_real_weights_is_not_degenerate():
    model = load_model("deit_tiny_patch16_224", checkpoint=DEIT_WEIGHTS)
    image = to_model_input(load_rgb(BOTH_IMAGE), preprocessing_for(model))[None]
    mask = AttentionFlow(model)(image)[0]
    assert mask.shape == (14, 14) and float(mask.max()) == pytest.approx(1.0)
    assert float(mask.std()) > 0.01 and float(mask.min()) < 0.9


def test_flow_explainer_on_gap_model_matches_networkx_and_batches():
    model = load_model("test_vit2", pretrained=False, img_size=64)  # 1 register token, 4×4 patches, avg pooling
    images = torch.randn(3, 3, 64, 64)
    fast = AttentionFlow(model, discard_ratio=0.5)
    reference = AttentionFlow(model, discard_ratio=0.5, solver="networkx")
    masks = fast(images)
    assert masks.shape == (3, 4, 4)
    torch.testing.assert_close(masks, reference(images), rtol=0, atol=1e-6)
    torch.testing.assert_close(masks, torch.cat([fast(images[i:i + 1]) for i in range(3)]), rtol=1e-5, atol=1e-6)


def test_progress_reports_every_sink():
    layout = TokenLayout(1, (4, 5), (0,))
    transitions = torch.from_numpy(random_transitions(2, 21, 0.0, seed=0))
    reports = []
    readout = torch.zeros(1, 21, dtype=torch.float64)
    readout[0, 0] = 1
    attention_flow([t[None] for t in transitions], readout, layout, on_flows=lambda done, total: reports.append((done, total)))
    assert reports[-1] == (20, 20) and all(total == 20 for _, total in reports)


def test_unknown_solver_is_rejected():
    with pytest.raises(ValueError, match="dinic, networkx"):
        check_solver("ortools")
