"""End to end: secure modality-aware FedAvg equals plain FedAvg, dropouts are recovered, too many
dropouts fail cleanly, and sites refuse requests that would unmask an individual update."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from fedfusion.common.secagg import (
    AggregateResult,
    ProtocolViolation,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    Stage,
    UnmaskRequest,
    VectorLayout,
    run_round,
)

CLIP = 0.5
SHAPES = {"image.w": (6, 4), "clinical.w": (5,), "omics.w": (8,), "head.w": (4, 2), "head.b": (2,)}
GROUPS = {"image.w": "image", "clinical.w": "clinical", "omics.w": "omics", "head.w": "shared", "head.b": "shared"}
NODES = [101, 202, 303, 404, 505]
LACKING = {202: {"omics"}, 404: {"image"}, 505: {"omics", "clinical"}}
LAYOUT = VectorLayout(SHAPES, GROUPS)

Updates = dict[int, dict[str, np.ndarray]]
Weights = dict[int, dict[str, float]]


def _federation(nodes: list[int], lacking: Mapping[int, set[str]] = LACKING, seed: int = 0) -> tuple[Updates, Weights]:
    """Random updates in [-CLIP, CLIP]; a site lacking a group sends no keys and weight 0 for it."""
    rng = np.random.default_rng(seed)
    updates: Updates = {}
    weights: Weights = {}
    for node in nodes:
        missing = lacking.get(node, set())
        cases = int(rng.integers(50, 400))
        weights[node] = {g: (0.0 if g in missing else float(cases - 10 * i)) for i, g in enumerate(LAYOUT.groups)}
        updates[node] = {
            name: rng.uniform(-CLIP, CLIP, shape) for name, shape in SHAPES.items() if GROUPS[name] not in missing
        }
    return updates, weights


def _plain_fedavg(updates: Updates, weights: Weights, nodes: list[int]) -> dict[str, np.ndarray]:
    """Modality-aware FedAvg in the clear: each parameter over the sites with weight for its group."""
    out = {}
    for name, group in GROUPS.items():
        have = [n for n in nodes if weights[n][group] > 0]
        if have:
            total = sum(weights[n][group] for n in have)
            out[name] = sum(weights[n][group] * updates[n][name] for n in have) / total
    return out


def _assert_matches_plain(result: AggregateResult, config: SecAggConfig, updates: Updates, weights: Weights) -> None:
    survivors = list(result.survivors)
    expected = _plain_fedavg(updates, weights, survivors)
    encoder = config.encoder(LAYOUT)
    bound, m = config.weight_bound, len(survivors)
    error_sum = m * encoder.update_codec.step * bound / 2  # worst case of the quantised weighted sum
    error_weight = m * encoder.weight_codec.step * bound / 2
    averages = result.averages()
    assert set(averages) == set(expected)
    for name, value in expected.items():
        group_weight = sum(weights[n][GROUPS[name]] for n in survivors)
        assert result.weight_sums[GROUPS[name]] == pytest.approx(group_weight, abs=error_weight)
        tolerance = (error_sum + CLIP * error_weight) / (group_weight - error_weight)
        assert np.abs(averages[name] - value).max() <= tolerance
        assert tolerance <= 1e-3 * CLIP


@pytest.mark.parametrize("bits", [32, 64])
def test_secure_modality_aware_fedavg_equals_plain_fedavg(bits: int) -> None:
    updates, weights = _federation(NODES)
    config = SecAggConfig.create(NODES, LAYOUT, clip=CLIP, bits=bits, weight_bound=1000.0)

    result = run_round(config, LAYOUT, updates, weights)

    assert result.survivors == tuple(NODES)
    _assert_matches_plain(result, config, updates, weights)
    if bits == 64:
        for name, value in _plain_fedavg(updates, weights, NODES).items():
            assert np.abs(result.averages()[name] - value).max() <= 1e-6 * CLIP


def test_secure_fedavg_without_modality_weights_equals_plain_fedavg() -> None:
    updates, weights = _federation(NODES, lacking={})

    config = SecAggConfig.create(NODES, LAYOUT, clip=CLIP, bits=64, weight_bound=1000.0)
    result = run_round(config, LAYOUT, updates, weights)

    _assert_matches_plain(result, config, updates, weights)


def test_a_group_no_site_has_is_left_out_of_the_averages() -> None:
    updates, weights = _federation(NODES, lacking={n: {"omics"} for n in NODES})
    config = SecAggConfig.create(NODES, LAYOUT, clip=CLIP, bits=64, weight_bound=1000.0)

    result = run_round(config, LAYOUT, updates, weights)

    assert result.weight_sums["omics"] == 0.0
    assert "omics.w" not in result.averages()


@pytest.mark.parametrize(
    "drop_after",
    [{202: 0}, {202: 1}, {202: 2}, {202: 3}, {202: 2, 404: 2}, {202: 3, 404: 3}, {202: 1, 505: 3}],
    ids=["never", "after-keys", "after-shares", "after-masked", "2-after-shares", "2-after-masked", "mixed"],
)
def test_dropouts_between_stages_are_recovered(drop_after: dict[int, int]) -> None:
    updates, weights = _federation(NODES)
    config = SecAggConfig.create(NODES, LAYOUT, clip=CLIP, bits=64, weight_bound=1000.0, threshold=3)

    result = run_round(config, LAYOUT, updates, weights, drop_after=drop_after)

    assert result.survivors == tuple(n for n in NODES if drop_after.get(n, 5) >= 3)
    _assert_matches_plain(result, config, updates, weights)


@pytest.mark.parametrize(
    ("drop_after", "message"),
    [
        ({101: 3, 202: 3, 303: 3}, "cannot recover node"),  # masked inputs sent, too few holders left
        ({101: 2, 202: 2, 303: 2}, "only 2 sites sent masked inputs"),
        ({101: 1, 202: 1, 303: 1}, "only 2 sites shared their keys"),
        ({101: 0, 202: 0, 303: 0}, "only 2 sites advertised keys"),
    ],
)
def test_too_many_dropouts_abort_cleanly(drop_after: dict[int, int], message: str) -> None:
    updates, weights = _federation(NODES)
    config = SecAggConfig.create(NODES, LAYOUT, clip=CLIP, threshold=3)

    with pytest.raises(SecAggAbort, match=message):
        run_round(config, LAYOUT, updates, weights, drop_after=drop_after)


def test_many_sites_on_a_k_regular_graph_with_dropouts() -> None:
    nodes = list(range(1000, 1016))
    updates, weights = _federation(nodes, lacking={1003: {"image"}, 1007: {"omics"}})
    config = SecAggConfig.create(nodes, LAYOUT, clip=CLIP, bits=64, weight_bound=1000.0)
    assert config.degree == 12 and config.threshold == 9

    result = run_round(config, LAYOUT, updates, weights, drop_after={1001: 2, 1009: 2, 1012: 3})

    assert len(result.survivors) == 14
    _assert_matches_plain(result, config, updates, weights)


def test_two_sites_run_only_with_the_override() -> None:
    nodes = [7, 8]
    updates, weights = _federation(nodes, lacking={})
    config = SecAggConfig.create(nodes, LAYOUT, clip=CLIP, bits=64, weight_bound=1000.0, allow_two_sites=True)

    result = run_round(config, LAYOUT, updates, weights)

    _assert_matches_plain(result, config, updates, weights)


def _at_unmask_stage(drop_after: Mapping[int, int] | None = None) -> tuple[dict[int, SecAggClient], UnmaskRequest]:
    """Drive the five sites through stages 1-3 by hand; return them waiting for stage 4."""
    drop = dict(drop_after or {})
    updates, weights = _federation(NODES)
    config = SecAggConfig.create(NODES, LAYOUT, clip=CLIP, threshold=3)
    clients = {n: SecAggClient(n, config, LAYOUT) for n in NODES}
    server = SecAggServer(config, LAYOUT)
    keys = server.collect_keys({n: c.advertise_keys() for n, c in clients.items()})
    routed = server.route_shares({n: clients[n].share_keys(keys) for n in keys if drop.get(n, 5) >= 2})
    vectors = {
        n: clients[n].masked_input(routed[n], updates[n], weights[n]).vector for n in routed if drop.get(n, 5) >= 3
    }
    return clients, server.collect_masked_inputs(vectors)


def test_site_refuses_a_request_for_both_shares_of_one_node() -> None:
    clients, request = _at_unmask_stage(drop_after={505: 2})
    greedy = UnmaskRequest(request.survivors, (*request.dropped, 202))  # 202 survived: b and s wanted
    site = clients[101]

    with pytest.raises(ProtocolViolation, match="both shares of node"):
        site.unmask(greedy)

    assert site.stage is Stage.FAILED
    with pytest.raises(ProtocolViolation):  # and it answers nothing more this round
        site.unmask(request)


def test_site_refuses_to_be_listed_as_dropped_or_to_unmask_a_tiny_sum() -> None:
    clients, request = _at_unmask_stage()

    with pytest.raises(ProtocolViolation, match="not surviving"):
        clients[101].unmask(UnmaskRequest((202, 303, 404), (101,)))
    with pytest.raises(ProtocolViolation, match="sum of 2 sites"):
        clients[202].unmask(UnmaskRequest((202, 303), ()))
    clients[303].unmask(request)
    with pytest.raises(ProtocolViolation, match="stage UNMASK while in stage DONE"):
        clients[303].unmask(request)


def test_site_answers_each_node_with_exactly_one_kind_of_share() -> None:
    clients, request = _at_unmask_stage(drop_after={505: 2})

    reply = clients[101].unmask(request)

    assert set(reply.self_mask_shares) == set(request.survivors)
    assert set(reply.mask_key_shares) == {505}


def test_tampered_share_bundle_is_refused_by_the_site() -> None:
    config = SecAggConfig.create(NODES, LAYOUT, clip=CLIP)
    clients = {n: SecAggClient(n, config, LAYOUT) for n in NODES}
    server = SecAggServer(config, LAYOUT)
    keys = server.collect_keys({n: c.advertise_keys() for n, c in clients.items()})
    routed = server.route_shares({n: c.share_keys(keys) for n, c in clients.items()})
    routed[101][202] = routed[101][303]  # the server swaps two senders' bundles
    updates, weights = _federation(NODES)

    with pytest.raises(ProtocolViolation, match="failed authentication"):
        clients[101].masked_input(routed[101], updates[101], weights[101])


def test_site_refuses_keys_the_server_altered() -> None:
    config = SecAggConfig.create(NODES, LAYOUT, clip=CLIP)
    clients = {n: SecAggClient(n, config, LAYOUT) for n in NODES}
    keys = {n: c.advertise_keys() for n, c in clients.items()}
    replayed = {**keys, 202: keys[101]}

    with pytest.raises(ProtocolViolation, match="equal"):
        clients[303].share_keys(replayed)
    with pytest.raises(ProtocolViolation, match="own public keys"):
        clients[101].share_keys({**keys, 101: keys[202]})


def test_malformed_masked_vector_counts_as_a_dropout() -> None:
    updates, weights = _federation(NODES)
    config = SecAggConfig.create(NODES, LAYOUT, clip=CLIP, bits=64, weight_bound=1000.0, threshold=3)
    clients = {n: SecAggClient(n, config, LAYOUT) for n in NODES}
    server = SecAggServer(config, LAYOUT)
    keys = server.collect_keys({n: c.advertise_keys() for n, c in clients.items()})
    routed = server.route_shares({n: c.share_keys(keys) for n, c in clients.items()})
    vectors = {n: clients[n].masked_input(routed[n], updates[n], weights[n]).vector for n in NODES}
    vectors[404] = vectors[404][:-1]

    request = server.collect_masked_inputs(vectors)
    result = server.unmask({n: clients[n].unmask(request) for n in request.survivors})

    assert request.dropped == (404,)
    assert "masked vector" in server.rejected[404]
    _assert_matches_plain(result, config, updates, weights)


def test_site_refuses_a_layout_other_than_the_servers() -> None:
    config = SecAggConfig.create(NODES, LAYOUT, clip=CLIP)
    other = VectorLayout({**SHAPES, "head.b": (3,)}, GROUPS)

    with pytest.raises(ValueError, match="layout differs"):
        SecAggClient(101, config, other)


def test_server_enforces_stage_order() -> None:
    server = SecAggServer(SecAggConfig.create(NODES, LAYOUT, clip=CLIP), LAYOUT)

    with pytest.raises(ProtocolViolation, match="stage SHARE_KEYS while in stage ADVERTISE_KEYS"):
        server.route_shares({})
