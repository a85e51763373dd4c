"""Attention Flow (Abnar & Zuidema, 2020): max-flow through the layer graph.

Nodes are ``(l, i)`` for layers ``l = 0 … L`` and tokens ``i``; an edge
``(l+1, i) → (l, j)`` has capacity ``Â_{l+1}[i, j]``, the residual,
row-normalised fused attention of block ``l+1`` (the matrices rollout
multiplies). A source ``s`` feeds the top layer with capacities ``r_i``, the
readout weights: for CLS models ``r = e_CLS``, so ``s → (L, CLS)`` carries at
most 1 — the flow from the CLS node itself; for distilled, average-pooled or
attention-pooled models ``r`` spreads the unit of flow over the tokens the
head reads (see :func:`vitexplain.capture.readout_weights`).

The value of input patch ``j`` is the maximum ``s → (0, j)`` flow; the mask is
those values over the patch grid, scaled to max 1. Where rollout sums over all
paths (products of weights), flow is limited by each path's narrowest edge, so
its maps are smoother and less dominated by a few strong paths.

Solvers: ``dinic`` (default, exact float64, compiled; :mod:`.maxflow`) and
``networkx`` (the reference, as the method's authors computed it).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from .base import DISCARD_RATIO, FUSION, Param, RolloutExplainer
from .registry import register_method

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

    from ..capture.record import Capture
    from ..capture.tokens import TokenLayout


class NetworkxFlow:
    """Reference solver: the layer graph as a networkx ``DiGraph``, ``nx.maximum_flow_value`` per sink."""

    def __init__(self, transitions: np.ndarray, readout: np.ndarray):
        import networkx as nx
        import numpy as np

        self._maximum_flow_value = nx.maximum_flow_value
        layers = transitions.shape[0]
        self.graph = nx.DiGraph()
        self.graph.add_edges_from(("source", (layers, int(i)), {"capacity": float(readout[i])})
                                  for i in np.flatnonzero(readout > 0))
        for layer in range(layers, 0, -1):
            matrix = transitions[layer - 1]
            rows, cols = np.nonzero(matrix > 0)
            self.graph.add_edges_from(((layer, int(i)), (layer - 1, int(j)), {"capacity": float(c)})
                                      for i, j, c in zip(rows, cols, matrix[rows, cols]))

    def __call__(self, sinks: Sequence[int]) -> np.ndarray:
        import numpy as np

        return np.array([self._maximum_flow_value(self.graph, "source", (0, int(j))) if (0, int(j)) in self.graph else 0.0
                         for j in sinks])


class DinicFlow:
    """Default solver: exact float64 Dinic on a CSR graph built once per image (:mod:`.maxflow`)."""

    def __init__(self, transitions: np.ndarray, readout: np.ndarray):
        from ..kernels.maxflow import build_layered_graph

        self.graph = build_layered_graph(transitions, readout)
        self.first_layer = transitions[0]

    def __call__(self, sinks: Sequence[int]) -> np.ndarray:
        import numpy as np

        from ..kernels.maxflow import flows_to_sinks
        from .rollout_steps import torch_threads_kept

        with torch_threads_kept():
            return flows_to_sinks(self.graph, self.first_layer[:, np.asarray(sinks, dtype=np.int64)])


FLOW_SOLVERS: dict[str, type] = {"dinic": DinicFlow, "networkx": NetworkxFlow}
SOLVERS: tuple[str, ...] = tuple(FLOW_SOLVERS)
SOLVER = Param("solver", str, "dinic", "Max-flow solver: dinic (exact, compiled) or networkx (the reference, "
               "minutes per image).", choices=SOLVERS)


def check_solver(solver: str) -> str:
    return SOLVER.parse(solver, "flow solver")


def flow_values(transitions: np.ndarray, readout: np.ndarray, sinks: Sequence[int], solver: str = "dinic",
                chunk: int = 28, on_flows: Callable[[int, int], None] = lambda done, total: None) -> np.ndarray:
    """Max-flow values from the source to ``(0, j)`` for ``j`` in ``sinks``, for one image.

    ``transitions`` is ``(L, N, N)`` (block 1 first), ``readout`` ``(N,)``. Sinks are solved in
    chunks; ``on_flows(done, total)`` reports progress after each.
    """
    import numpy as np

    solve = FLOW_SOLVERS[check_solver(solver)](transitions, readout)
    sinks = list(sinks)
    values = []
    for first in range(0, len(sinks), chunk):
        values.append(solve(sinks[first:first + chunk]))
        on_flows(min(first + chunk, len(sinks)), len(sinks))
    return np.concatenate(values)


def attention_flow(transitions: Sequence[Tensor], readout: Tensor, layout: TokenLayout, solver: str = "dinic",
                   on_flows: Callable[[int, int], None] = lambda done, total: None) -> Tensor:
    """Flow masks ``(B, gh, gw)`` from per-layer transition matrices ``L × (B, N, N)`` (block 1 first)."""
    import numpy as np
    import torch

    from .rollout_steps import to_mask

    stacked = torch.stack([t.detach().double().cpu() for t in transitions], dim=1).numpy()  # (B, L, N, N)
    weights = readout.detach().double().cpu().numpy()
    sinks = range(layout.num_prefix_tokens, layout.num_tokens)
    values = np.zeros((stacked.shape[0], layout.num_tokens))
    for b in range(stacked.shape[0]):
        values[b, layout.num_prefix_tokens:] = flow_values(stacked[b], weights[b], sinks, solver, on_flows=on_flows)
    return to_mask(torch.from_numpy(values), layout).float()


@register_method
class AttentionFlow(RolloutExplainer):
    """Attention Flow: max-flow through the layer graph."""

    name = "flow"
    summary = "Attention Flow (Abnar & Zuidema 2020): max-flow from the readout down the layer graph to each patch."
    description = ("Edges between consecutive layers carry the same residual, row-normalised fused attention that "
                   "rollout multiplies; a patch's value is the maximum flow that reaches it. Exact (--solver dinic, "
                   "compiled; or the networkx reference). Overlays are contrast-stretched by default.")
    params = (FUSION, DISCARD_RATIO, SOLVER)
    stretch_overlay = True  # flow values are high almost everywhere; the contrast is in the differences

    def head_maps(self, capture: Capture, gradients: list[Tensor] | None) -> list[Tensor]:
        return list(capture.attentions)

    def masks_for(self, capture: Capture, gradients: list[Tensor] | None, discard_ratios: Sequence[float]) -> Tensor:
        import torch

        from .rollout_steps import transitions_by_ratio

        layout, fused = capture.layout, self.fused_layers(capture, gradients)
        return torch.stack([attention_flow(t, capture.readout, layout, self.settings["solver"], self.on_progress)
                            for t in transitions_by_ratio(fused, discard_ratios, layout)], dim=1)
