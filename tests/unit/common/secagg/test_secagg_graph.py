"""Communication graph: complete for few sites, k-regular, symmetric and seed-determined for many."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfusion.common.secagg.graph import build_graph, default_degree


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 80), st.data(), st.binary(min_size=1, max_size=16))
def test_graph_is_k_regular_symmetric_connected_and_loop_free(n: int, data: st.DataObject, seed: bytes) -> None:
    degree = data.draw(st.integers(2, n - 1).filter(lambda k: k % 2 == 0 or n % 2 == 0))
    nodes = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))

    graph = build_graph(nodes, degree, seed)

    assert set(graph) == set(nodes)
    for node, peers in graph.items():
        assert len(peers) == degree
        assert node not in peers
        assert all(node in graph[peer] for peer in peers)
    assert _reachable(graph, nodes[0]) == set(nodes)


def test_graph_is_a_pure_function_of_the_seed() -> None:
    nodes = list(range(100, 140))

    assert build_graph(nodes, 8, b"seed") == build_graph(list(reversed(nodes)), 8, b"seed")
    assert build_graph(nodes, 8, b"seed") != build_graph(nodes, 8, b"other")


def test_few_sites_get_the_complete_graph() -> None:
    for n in range(2, 11):
        nodes = list(range(n))
        graph = build_graph(nodes, default_degree(n), b"s")
        assert all(peers == set(nodes) - {node} for node, peers in graph.items())


def test_many_sites_get_a_logarithmic_even_degree() -> None:
    assert default_degree(11) == 10
    assert default_degree(50) == 18
    assert default_degree(1000) == 30
    assert default_degree(40, complete_up_to=4) == 16


def test_impossible_degrees_are_refused() -> None:
    with pytest.raises(ValueError, match="odd degree needs an even node count"):
        build_graph(list(range(15)), 5, b"s")
    with pytest.raises(ValueError, match="degree must be in"):
        build_graph(list(range(5)), 5, b"s")
    with pytest.raises(ValueError, match="distinct"):
        build_graph([1, 1, 2], 1, b"s")


def _reachable(graph: dict[int, frozenset[int]], start: int) -> set[int]:
    seen, frontier = {start}, [start]
    while frontier:
        for peer in graph[frontier.pop()]:
            if peer not in seen:
                seen.add(peer)
                frontier.append(peer)
    return seen
