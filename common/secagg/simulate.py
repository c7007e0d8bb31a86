"""An in-process round: the reference message flow for the Flower wiring, used by tests and benchmarks.

Every value the server receives is copied into a ``Transcript``, so a test can check that nothing
in it reveals an individual update. ``drop_after[node] = s`` makes a node stop answering after
stage ``s`` (0: never answers; 1: after advertising keys; 2: after sharing keys; 3: after sending
its masked input, i.e. it does not help unmasking).

With ``identities`` (node id -> (site id, signing key)) and ``roster`` the round runs the malicious-
coordinator protections of :mod:`fedfusion.common.secagg.signing` exactly as the Flower handlers do:
signed advertisements verified by every site, and the consistency round before unmasking.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedfusion.common.secagg.client import SecAggClient
from fedfusion.common.secagg.config import SecAggConfig
from fedfusion.common.secagg.layout import VectorLayout
from fedfusion.common.secagg.messages import AdvertisedKeys, AggregateResult, UnmaskReply, UnmaskRequest
from fedfusion.common.secagg.server import SecAggServer
from fedfusion.common.secagg.signing import (
    SitePolicy,
    advertisement_signature,
    check_round,
    survivors_signature,
    verify_advertisements,
    verify_survivor_signatures,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedfusion.common.roster import Roster


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
    identities: Mapping[int, tuple[str, ec.EllipticCurvePrivateKey]] | None = None,
    roster: Roster | None = None,
    policy: SitePolicy | None = None,
) -> AggregateResult:
    """One secure-aggregation round over ``config.node_ids``; raises ``SecAggAbort`` when too many drop
    (and ``ProtocolViolation`` when a signed round's checks fail at a site)."""
    drop_after = dict(drop_after or {})
    transcript = transcript if transcript is not None else Transcript()

    def alive(node: int, stage: int) -> bool:
        return drop_after.get(node, 5) >= stage

    clients = {node: SecAggClient(node, config, layout) for node in config.node_ids}
    server = SecAggServer(config, layout)

    signed = identities is not None and roster is not None
    policy = policy or SitePolicy()
    transcript.keys = {node: c.advertise_keys() for node, c in clients.items() if alive(node, 1)}
    if signed:
        check_round(config, policy)
        transcript.keys = {node: AdvertisedKeys(k.encryption_key, k.mask_key, identities[node][0],
                                                advertisement_signature(identities[node][1], identities[node][0],
                                                                        node, k, config, roster))
                           for node, k in transcript.keys.items()}
    broadcast = server.collect_keys(transcript.keys)

    sites: dict[int, str] = {}
    for node in broadcast:
        if signed and alive(node, 2):
            sites = verify_advertisements(roster, config, broadcast, node, identities[node][0], policy)
    transcript.bundles = {node: clients[node].share_keys(broadcast) for node in broadcast if alive(node, 2)}
    routed = server.route_shares(transcript.bundles)

    transcript.masked = {}
    for node in routed:
        if alive(node, 3):
            masked = clients[node].masked_input(routed[node], updates[node], weights[node])
            transcript.masked[node] = masked.vector
    request = transcript.request = server.collect_masked_inputs(transcript.masked)
    if signed:
        signatures = {node: survivors_signature(identities[node][1], config, request)
                      for node in request.survivors if alive(node, 4)}
        for _ in signatures:  # every revealing site checks (the same inputs here, the same cost as deployed)
            verify_survivor_signatures(roster, config, request, sites, signatures)

    transcript.replies = {node: clients[node].unmask(request) for node in request.survivors if alive(node, 4)}
    return server.unmask(transcript.replies)
