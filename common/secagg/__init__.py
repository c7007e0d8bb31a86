"""Secure aggregation (SecAgg+, Bell et al. 2020; Bonawitz et al. 2017) without Flower.

Sites mask their quantised, weighted updates with pairwise masks (X25519 + HKDF-SHA256 seeds,
AES-CTR expansion) and a self mask; Shamir shares of the mask secrets let the server remove the
masks of the *sum* while up to the threshold of sites drop out. The server learns the sum of the
surviving sites' weighted updates and the sum of their weights, per parameter group, and nothing
about an individual site beyond what those sums imply.

Threat model: privacy holds against an honest-but-curious server colluding with fewer than
``threshold`` share holders of a node, and against a *malicious* server (Bonawitz et al.'s actively
secure variant, :mod:`~fedfusion.common.secagg.signing`): every advertised key is signed by a site on
the federation roster and verified by every peer (no invented or re-labelled sites), a consistency
round makes every revealing site hold the same survivor set (signed by a majority of the round's
sites), and each site enforces its own bounds on sites, degree and threshold. Not covered: sites that
submit wrong shares or out-of-range inputs to corrupt the sum (robustness, not privacy), a server
colluding with a majority of a round's sites, and differencing of repeated *non-DP* trainings on
nearby global models (use DP-SGD). Transport security and node authentication come from TLS/Flower.

Layout: ``config`` (round parameters), ``client`` / ``server`` (the stage state machines; a client
saves and restores itself with ``to_state`` / ``from_state`` between stages), ``messages`` (plain
values on the wire), ``simulate`` (in-process reference round), ``settings`` (the run-config keys
and the names the Flower apps use on the wire), and the primitives ``shamir``, ``keys``,
``masking``, ``quantize``, ``layout``, ``graph``; ``signing`` (roster signatures, consistency round,
site policy) and ``testbed`` (keys and a roster for simulated sites). The Flower wiring lives in
``fedfusion.server.secure_aggregation`` and ``fedfusion.client.secure_aggregation``.
"""

from __future__ import annotations

from fedfusion.common.secagg.client import SecAggClient
from fedfusion.common.secagg.config import MIN_SITES, SecAggConfig, default_threshold
from fedfusion.common.secagg.errors import ProtocolViolation, SecAggAbort, SecAggError
from fedfusion.common.secagg.graph import build_graph, default_degree
from fedfusion.common.secagg.layout import VectorLayout, WeightedEncoder
from fedfusion.common.secagg.messages import (
    AdvertisedKeys,
    AggregateResult,
    MaskedInput,
    Stage,
    UnmaskReply,
    UnmaskRequest,
    bundles_from_dict,
    bundles_to_dict,
)
from fedfusion.common.secagg.quantize import FixedPointCodec, required_bits
from fedfusion.common.secagg.server import SecAggServer
from fedfusion.common.secagg.settings import SecureAggregationSettings
from fedfusion.common.secagg.simulate import Transcript, run_round

__all__ = [
    "MIN_SITES",
    "AdvertisedKeys",
    "AggregateResult",
    "FixedPointCodec",
    "MaskedInput",
    "ProtocolViolation",
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "SecureAggregationSettings",
    "Stage",
    "Transcript",
    "UnmaskReply",
    "UnmaskRequest",
    "VectorLayout",
    "WeightedEncoder",
    "build_graph",
    "bundles_from_dict",
    "bundles_to_dict",
    "default_degree",
    "default_threshold",
    "required_bits",
    "run_round",
]
