"""SecAggClient.to_state / from_state: a round whose sites are rebuilt from their saved state before
every stage (a new process per message) gives the same sum; secrets are dropped as they are used."""

from __future__ import annotations

import numpy as np
import pytest

from fedfusion.common.secagg import ProtocolViolation, SecAggClient, SecAggConfig, SecAggServer, Stage, VectorLayout

SHAPES = {"image.w": (3, 2), "head.w": (4,)}
GROUPS = {"image.w": "image", "head.w": "shared"}
LAYOUT = VectorLayout(SHAPES, GROUPS)
NODES = [3, 2**63 + 1, 2**64 - 5]


def _reload(client: SecAggClient) -> SecAggClient:
    """What a fresh process gets: only the flat state values (copied, so nothing is shared)."""
    state = {k: (list(v) if isinstance(v, list) else v) for k, v in client.to_state().items()}
    return SecAggClient.from_state(state)


def test_round_with_a_new_process_per_stage_gives_the_sum() -> None:
    rng = np.random.default_rng(0)
    config = SecAggConfig.create(NODES, LAYOUT, clip=1.0, weight_bound=100.0)
    updates = {n: {k: rng.uniform(-1, 1, s) for k, s in SHAPES.items()} for n in NODES}
    weights = {n: {"image": float(10 + i), "shared": float(20 + i)} for i, n in enumerate(NODES)}
    server = SecAggServer(config, LAYOUT)
    clients = {n: SecAggClient(n, config, LAYOUT) for n in NODES}
    keys = {}
    for n in NODES:
        keys[n] = clients[n].advertise_keys()
        clients[n] = _reload(clients[n])
    broadcast = server.collect_keys(keys)
    bundles = {}
    for n in NODES:
        bundles[n] = clients[n].share_keys(broadcast)
        clients[n] = _reload(clients[n])
    routed = server.route_shares(bundles)
    vectors = {}
    for n in NODES:
        vectors[n] = clients[n].masked_input(routed[n], updates[n], weights[n]).vector
        state = clients[n].to_state()
        assert not {"encryption-private-key", "mask-private-key", "self-mask-seed"} & set(state)
        clients[n] = _reload(clients[n])
    request = server.collect_masked_inputs(vectors)
    replies = {n: clients[n].unmask(request) for n in NODES}
    result = server.unmask(replies)
    for name, group in GROUPS.items():
        expected = sum(weights[n][group] * updates[n][name] for n in NODES) / sum(weights[n][group] for n in NODES)
        np.testing.assert_allclose(result.averages()[name], expected, atol=1e-4)


def test_state_holds_the_stage_and_the_secrets_until_they_are_used() -> None:
    config = SecAggConfig.create(NODES, LAYOUT, clip=1.0)
    client = SecAggClient(NODES[0], config, LAYOUT)
    client.advertise_keys()
    state = client.to_state()
    assert Stage(state["stage"]) is Stage.SHARE_KEYS
    assert {"encryption-private-key", "mask-private-key"} <= set(state) and "self-mask-seed" not in state
    rebuilt = SecAggClient.from_state(state)
    assert rebuilt.stage is Stage.SHARE_KEYS and rebuilt.layout.digest() == LAYOUT.digest()
    with pytest.raises(ProtocolViolation, match="stage ADVERTISE_KEYS while in stage SHARE_KEYS"):
        rebuilt.advertise_keys()  # a replayed stage-1 message cannot make new keys mid-round


def test_unreadable_state_is_refused() -> None:
    config = SecAggConfig.create(NODES, LAYOUT, clip=1.0)
    state = SecAggClient(NODES[0], config, LAYOUT).to_state()
    del state["peers"]
    with pytest.raises(ProtocolViolation, match="unreadable"):
        SecAggClient.from_state(state)
    state = SecAggClient(NODES[0], config, LAYOUT).to_state()
    state["config.layout-digest"] = "0" * 64
    with pytest.raises(ProtocolViolation, match="layout differs"):
        SecAggClient.from_state(state)
