"""An exact float64 max-flow solver (Dinic's algorithm) for the layered attention graph, compiled with numba.

The graph of one image is built once, in CSR form with paired reverse arcs; only
the capacities of the arcs into the sink change from one input token to the next.
Flows to different sinks are independent and run in parallel threads.

Dinic's algorithm: repeat { BFS levels from the source over arcs with residual
capacity; push blocking flow along level-increasing paths (current-arc DFS) }
until the sink is unreachable. Each phase lengthens the shortest augmenting
path, so at most ``V`` phases run; within a phase each augmentation saturates
one arc exactly (its residual becomes ``x − x = 0``). Arcs whose residual is at
most ``SATURATED`` (1e-15) count as saturated; capacities are rows of
stochastic matrices, so this changes a flow by at most ``1e-15`` per arc of the
minimum cut.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

SATURATED = 1e-15


@dataclass
class LayeredGraph:
    """CSR residual graph: node 0 is the source, node ``sink`` the sink.

    ``sink_arcs[i]`` is the arc from layer-1 node ``i`` into the sink; its capacity
    is set per target token.
    """

    start: np.ndarray  # (V + 1,) int64: arcs of node u are start[u]:start[u+1]
    head: np.ndarray  # (A,) int64
    tail: np.ndarray  # (A,) int64
    reverse: np.ndarray  # (A,) int64
    capacity: np.ndarray  # (A,) float64, sink arcs at 0
    sink_arcs: np.ndarray  # (N,) int64
    sink: int


def build_layered_graph(transitions: np.ndarray, readout: np.ndarray) -> LayeredGraph:
    """CSR graph for ``transitions`` ``(L, N, N)`` (block 1 first) and source capacities ``readout`` ``(N,)``.

    Nodes: source 0; token ``i`` of layer ``b`` (``b = L … 1``) is ``1 + (L − b)·N + i``; the sink
    ``1 + L·N``. Arcs: source → (L, i) with capacity ``r_i``; (b, i) → (b − 1, j) with capacity
    ``Â_b[i, j]`` for ``b ≥ 2``; (1, i) → sink. Zero capacities are left out.
    """
    layers, n, _ = transitions.shape
    sink = 1 + layers * n
    tails, heads, caps = [], [], []
    tokens = np.arange(n)
    keep = readout > 0
    tails.append(np.zeros(int(keep.sum()), dtype=np.int64))
    heads.append(1 + tokens[keep])
    caps.append(readout[keep])
    for depth in range(layers - 1):  # depth 0 is layer L
        matrix = transitions[layers - 1 - depth]
        rows, cols = np.nonzero(matrix > 0)
        tails.append(1 + depth * n + rows)
        heads.append(1 + (depth + 1) * n + cols)
        caps.append(matrix[rows, cols])
    tails.append(1 + (layers - 1) * n + tokens)
    heads.append(np.full(n, sink))
    caps.append(np.zeros(n))
    tail = np.concatenate(tails).astype(np.int64)
    head = np.concatenate(heads).astype(np.int64)
    forward = len(tail)
    all_tail = np.concatenate([tail, head])
    all_head = np.concatenate([head, tail])
    all_cap = np.concatenate([np.concatenate(caps).astype(np.float64), np.zeros(forward)])
    order = np.argsort(all_tail, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    partner = np.concatenate([np.arange(forward, 2 * forward), np.arange(forward)])
    start = np.zeros(sink + 2, dtype=np.int64)
    np.cumsum(np.bincount(all_tail, minlength=sink + 1), out=start[1:])
    return LayeredGraph(
        start=start,
        head=all_head[order],
        tail=all_tail[order],
        reverse=position[partner[order]],
        capacity=all_cap[order],
        sink_arcs=position[forward - n: forward],
        sink=sink,
    )


@numba.njit(cache=True)
def _levels(start, head, residual, level, queue, sink):
    level[:] = -1
    level[0] = 0
    queue[0] = 0
    first, last = 0, 1
    while first < last:
        u = queue[first]
        first += 1
        for arc in range(start[u], start[u + 1]):
            v = head[arc]
            if level[v] < 0 and residual[arc] > SATURATED:
                level[v] = level[u] + 1
                queue[last] = v
                last += 1
    return level[sink] >= 0


@numba.njit(cache=True)
def _blocking_flow(start, head, tail, reverse, residual, level, current, path, sink):
    total = 0.0
    current[:] = start[:-1]
    depth = 0
    u = 0
    while True:
        if u == sink:
            pushed = np.inf
            for k in range(depth):
                pushed = min(pushed, residual[path[k]])
            first_saturated = depth
            for k in range(depth):
                arc = path[k]
                residual[arc] -= pushed
                residual[reverse[arc]] += pushed
                if first_saturated == depth and residual[arc] <= SATURATED:
                    first_saturated = k
            total += pushed
            depth = first_saturated  # resume from the tail of the first saturated arc
            u = tail[path[depth]]
            continue
        advanced = False
        while current[u] < start[u + 1]:
            arc = current[u]
            v = head[arc]
            if residual[arc] > SATURATED and level[v] == level[u] + 1:
                path[depth] = arc
                depth += 1
                u = v
                advanced = True
                break
            current[u] += 1
        if not advanced:
            level[u] = -1  # dead end for the rest of this phase
            if depth == 0:
                return total
            depth -= 1
            u = tail[path[depth]]
            current[u] += 1


@numba.njit(cache=True)
def max_flow(start, head, tail, reverse, residual, sink):
    """Maximum flow value from node 0 to ``sink``; ``residual`` is updated in place."""
    nodes = start.shape[0] - 1
    level = np.empty(nodes, dtype=np.int64)
    queue = np.empty(nodes, dtype=np.int64)
    current = np.empty(nodes, dtype=np.int64)
    path = np.empty(nodes, dtype=np.int64)
    total = 0.0
    while _levels(start, head, residual, level, queue, sink):
        total += _blocking_flow(start, head, tail, reverse, residual, level, current, path, sink)
    return total


@numba.njit(parallel=True, cache=True)
def _flows_to_sinks(start, head, tail, reverse, capacity, sink_arcs, sink_capacities, sink):
    count = sink_capacities.shape[1]
    values = np.empty(count, dtype=np.float64)
    for s in numba.prange(count):
        residual = capacity.copy()
        residual[sink_arcs] = sink_capacities[:, s]
        values[s] = max_flow(start, head, tail, reverse, residual, sink)
    return values


def flows_to_sinks(graph: LayeredGraph, sink_capacities: np.ndarray) -> np.ndarray:
    """Max-flow value for each column of ``sink_capacities`` ``(N, S)``: the capacities into the sink."""
    return _flows_to_sinks(graph.start, graph.head, graph.tail, graph.reverse, graph.capacity,
                           graph.sink_arcs, np.ascontiguousarray(sink_capacities, dtype=np.float64), graph.sink)
