"""An in-process round: the reference message flow for the Flower wiring, used by tests and benchmarks.

Every value the server receives is copied into a ``Transcript``, so a test can check that nothing
in it reveals an individual update. ``drop_after[node] = s`` makes a node stop answering after
stage ``s`` (0: never answers; 1: after advertising keys; 2: after sharing keys; 3: after sending
its masked input, i.e. it does not help unmasking).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedfusion.common.secagg.client import SecAggClient
from fedfusion.common.secagg.config import SecAggConfig
from fedfusion.common.secagg.layout import VectorLayout
from fedfusion.common.secagg.messages import AdvertisedKeys, AggregateResult, UnmaskReply, UnmaskRequest
from fedfusion.common.secagg.server import SecAggServer


@dataclass
class Transcript:
    """Everything the server received (and the unmask request it sent), stage by stage."""

    keys: dict[int, AdvertisedKeys] = field(default_factory=dict)
    bundles: dict[int, dict[int, bytes]] = field(default_factory=dict)
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    request: UnmaskRequest | None = None
    replies: dict[int, UnmaskReply] = field(default_factory=dict)


def run_round(
    config: SecAggConfig,
    layout: VectorLayout,
    updates: Mapping[int, Mapping[str, np.ndarray]],
    weights: Mapping[int, Mapping[str, float]],
    *,
    drop_after: Mapping[int, int] | None = None,
    transcript: Transcript | None = None,
) -> AggregateResult:
    """One secure-aggregation round over ``config.node_ids``; raises ``SecAggAbort`` when too many drop."""
    drop_after = dict(drop_after or {})
    transcript = transcript if transcript is not None else Transcript()

    def alive(node: int, stage: int) -> bool:
        return drop_after.get(node, 5) >= stage

    clients = {node: SecAggClient(node, config, layout) for node in config.node_ids}
    server = SecAggServer(config, layout)

    transcript.keys = {node: c.advertise_keys() for node, c in clients.items() if alive(node, 1)}
    broadcast = server.collect_keys(transcript.keys)

    transcript.bundles = {node: clients[node].share_keys(broadcast) for node in broadcast if alive(node, 2)}
    routed = server.route_shares(transcript.bundles)

    transcript.masked = {}
    for node in routed:
        if alive(node, 3):
            masked = clients[node].masked_input(routed[node], updates[node], weights[node])
            transcript.masked[node] = masked.vector
    request = transcript.request = server.collect_masked_inputs(transcript.masked)

    transcript.replies = {node: clients[node].unmask(request) for node in request.survivors if alive(node, 4)}
    return server.unmask(transcript.replies)
