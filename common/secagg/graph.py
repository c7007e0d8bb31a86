"""The communication graph: which sites exchange pairwise masks and hold each other's shares.

SecAgg (Bonawitz et al. 2017) uses the complete graph: every site agrees a mask with every other,
O(n^2) work. SecAgg+ (Bell et al. 2020) shows a random k-regular graph with k = O(log n) keeps
the guarantees with high probability, so many sites scale. For few sites the complete graph costs
little and is the safest, so it is used up to ``complete_up_to`` sites.

The graph is a circulant (each site linked to the k/2 nearest on either side of a ring, plus the
opposite site when k is odd) over a pseudo-random ordering of the node ids. The ordering is a pure
function of the seed the server publishes (SHA-256, no library RNG whose algorithm could change
between versions), so every site computes the same graph without further messages.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

DEFAULT_COMPLETE_UP_TO = 10
"""Up to this many sites every site neighbours every other."""


def default_degree(num_nodes: int, complete_up_to: int = DEFAULT_COMPLETE_UP_TO) -> int:
    """Neighbours per site: everyone up to ``complete_up_to`` sites, else the even number nearest
    above ``max(complete_up_to - 1, 3 * log2(n))`` (Bell et al.'s O(log n), with a margin that keeps
    the failure probability of the graph small for the dropout rates hospitals see)."""
    if num_nodes < 2:
        raise ValueError("a graph needs at least 2 nodes")
    if num_nodes <= complete_up_to:
        return num_nodes - 1
    degree = max(complete_up_to - 1, math.ceil(3 * math.log2(num_nodes)))
    degree += degree % 2
    return min(degree, num_nodes - 1)


def build_graph(node_ids: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Neighbours of each node (excluding itself) in a ``degree``-regular graph determined by ``seed``.

    ``degree = len(node_ids) - 1`` gives the complete graph. An odd degree needs an even number of
    nodes (a k-regular graph on n nodes has n*k/2 edges).
    """
    nodes = sorted(set(node_ids))
    n = len(nodes)
    if n != len(node_ids):
        raise ValueError("node ids must be distinct")
    if n < 2:
        raise ValueError("a graph needs at least 2 nodes")
    if not 1 <= degree <= n - 1:
        raise ValueError(f"degree must be in 1..{n - 1} for {n} nodes, got {degree}")
    if degree == n - 1:
        return {node: frozenset(nodes) - {node} for node in nodes}
    if degree % 2 and n % 2:
        raise ValueError(f"no {degree}-regular graph exists on {n} nodes (odd degree needs an even node count)")
    ring = sorted(nodes, key=lambda node: hashlib.sha256(seed + b"|" + node.to_bytes(8, "big")).digest())
    neighbours: dict[int, set[int]] = {node: set() for node in nodes}
    offsets = list(range(1, degree // 2 + 1)) + ([n // 2] if degree % 2 else [])
    for position, node in enumerate(ring):
        for offset in offsets:
            other = ring[(position + offset) % n]
            neighbours[node].add(other)
            neighbours[other].add(node)
    return {node: frozenset(peers) for node, peers in neighbours.items()}
