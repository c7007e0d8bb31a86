"""One secure training round (SecAgg+) over Flower's Grid: the server learns sums, never an update.

With ``secure-aggregation = true`` the round loop (:mod:`fedfusion.server.federation`) calls
:func:`run_secure_round` instead of sending plain train messages. Five message exchanges, each a
``send_and_collect`` over the Grid (``train.<action>`` messages, answered by
:mod:`fedfusion.client.secure_aggregation`):

1. ``secagg_advertise_keys``: the global model (packed, as in a plain round), the train config and the
   round's public ``SecAggConfig`` (sampled node ids, threshold, graph seed, layout, packing slots).
   Each site trains exactly as in a plain round, keeps its update, and answers with two X25519 public keys.
2. ``secagg_share_keys``: everyone's public keys; each site answers with AES-GCM ciphertexts of
   Shamir shares of its secrets, one per neighbour, which the server cannot open.
3. ``secagg_masked_input``: the ciphertexts addressed to each site; each answers with its masked
   vector ``q(w * (x - global)) + masks`` (per-group example counts ``w`` masked alongside).
4. ``secagg_consistency``: the unmask request (which sites are in the sum); each survivor answers with
   its roster signature of it, and the server forwards all of them with stage 5 (sites reveal only when
   a majority of the round's sites signed the same request: no site can be shown another survivor set).
5. ``secagg_unmask``: which sites are in the sum; each answers with shares that let the server
   remove the masks of the *sum*. Sites that dropped between stages are recovered from the shares
   of the others while at least ``threshold`` holders answer.

What the server sees (all of it): each site's public keys, ciphertexts, a masked vector that is
uniformly random on its own, and shares of *either* a site's self-mask seed *or* its mask key,
never both; a site's refusal to train (its privacy policy) and errors. What it computes: the sums
``sum_i w_ig * (x_i - global)`` and ``sum_i w_ig`` per parameter group over the sites in the sum,
hence the modality-aware weighted average (the same as :func:`~fedfusion.server.strategy.modality_weighted_average`
up to quantisation) and the total example counts. No per-site loss, count or ε reaches it in a
secure round; the sites' clipped-entry counts arrive only as an example-weighted mean. Evaluation
(``_evaluate`` in the round loop) is unchanged: each site reports aggregate test metrics on its
own split, which are not model updates.

Integer buffers (``num_batches_tracked``) are not averaged by secure rounds; they keep the global
value. Client-level DP and FedAdam are refused with secure aggregation (see :func:`check_secure_compatible`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedfusion.common.config import ConfigError
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.packing import PackLayout, decode_vector
from fedfusion.common.records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    NUM_EXAMPLES,
    arrays_to_numpy,
    modality_count_key,
    numpy_to_arrays,
)
from fedfusion.common.secagg import (
    MIN_SITES,
    AdvertisedKeys,
    AggregateResult,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    UnmaskReply,
    VectorLayout,
    bundles_from_dict,
    bundles_to_dict,
)
from fedfusion.common.secagg.settings import (
    ACTION_ADVERTISE_KEYS,
    ACTION_CONSISTENCY,
    ACTION_MASKED_INPUT,
    ACTION_SHARE_KEYS,
    ACTION_UNMASK,
    BUNDLES_KEY,
    CLIPPED_ENTRY,
    CONTEXT_KEY,
    KEYS_KEY,
    LAYOUT_KEY,
    MASKED_ARRAY,
    MASKED_KEY,
    PACKING_KEY,
    REQUEST_KEY,
    ROUND_KEY,
    SHARES_KEY,
    SIGNATURE_KEY,
    SIGNATURES_KEY,
    TWO_SITES_HELP,
    WEIGHT_KEYS_KEY,
    SecureAggregationSettings,
)
from fedfusion.server.messaging import DEFAULT_POLL_INTERVAL_S, send_and_collect
from fedfusion.server.privacy import split_refusals
from fedfusion.server.strategy import SHARED_GROUP, ModalityAwareFedAvg, group_of_key

log = logging.getLogger("fedfusion.server.secagg")
T = TypeVar("T")

ROW_PREFIX = "secagg_"
KEY_STAGE_POLL_INTERVAL_S = 0.01
"""Reply polling interval for stages 2-4 (no training: sites answer within milliseconds)."""


@dataclass
class SecureRoundOutcome:
    """What one secure round gives the round loop.

    ``arrays`` is the new global model (None: the round failed and the model stays unchanged);
    ``metrics`` are federation-wide aggregates (summed example counts, mean clipped fraction);
    ``row`` the per-round status (``secagg_*``) for metrics.csv and reports; ``refusals`` the sites
    that refused to train (privacy policy), as :func:`~fedfusion.server.privacy.split_refusals` rows;
    ``participants`` the node ids that took part in the protocol (advertised keys).
    """

    arrays: ArrayRecord | None
    metrics: dict[str, float] = field(default_factory=dict)
    row: dict[str, Any] = field(default_factory=dict)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    failure: str = ""


def check_secure_compatible(cfg: FederationConfig) -> None:
    """Refuse combinations a secure round cannot serve, before anything trains.

    ``min-sites`` below 3 could let Flower sample 2 sites, whose sum would reveal each one's update
    to the other; :func:`run_secure_round` checks the sampled count again every round.
    Client-level DP needs every update clipped by Flower's mod and noise added to the average of
    individual replies; FedAdam's server optimizer runs inside Flower's ``aggregate_train`` on the
    individual replies. Neither sees individual updates under secure aggregation.
    """
    if not cfg.secure.enabled:
        return
    if cfg.min_sites < MIN_SITES and not cfg.secure.allow_two_sites:
        raise ConfigError(f"run config: secure-aggregation = true needs min-sites >= {MIN_SITES} (got "
                          f"{cfg.min_sites}), so that no round can sum fewer than {MIN_SITES} sites: {TWO_SITES_HELP}. "
                          f"Set min-sites = {MIN_SITES}, or secagg-allow-two-sites = true where that is acceptable "
                          "(a test bed)")
    if cfg.privacy.mode == "client":
        raise ConfigError("run config: secure-aggregation = true does not combine with dp-mode = \"client\"; use "
                          "dp-mode = \"sample\" (DP-SGD at each site, before masking) or turn one of them off")
    if cfg.strategy == "fedadam":
        raise ConfigError("run config: secure-aggregation = true supports strategy fedavg or fedprox, not fedadam "
                          "(its server optimizer needs the individual replies)")


def weight_key(group: str) -> str:
    """The reply metric that weighs ``group``: the rule of ``modality_weighted_average``."""
    return NUM_EXAMPLES if group == SHARED_GROUP else modality_count_key(group)


def masked_layout(global_arrays: Mapping[str, np.ndarray],
                  parameter_groups: Mapping[str, str]) -> tuple[VectorLayout, dict[str, str]]:
    """The masked vector's layout and the metric key that weighs each of its groups.

    Float arrays only, grouped as the strategy groups them; integer buffers are left out (they are
    not averaged). One extra shared entry (:data:`CLIPPED_ENTRY`) carries each site's clipped fraction.
    """
    shapes = {name: value.shape for name, value in global_arrays.items() if np.issubdtype(value.dtype, np.floating)}
    if not shapes:
        raise ConfigError("the global model has no floating-point arrays to aggregate")
    groups = {name: group_of_key(name, parameter_groups) for name in shapes}
    shapes[CLIPPED_ENTRY] = (1,)
    groups[CLIPPED_ENTRY] = SHARED_GROUP
    layout = VectorLayout(shapes, groups)
    return layout, {group: weight_key(group) for group in layout.groups}


def run_secure_round(grid: Grid, strategy: ModalityAwareFedAvg, server_round: int, arrays: ArrayRecord,
                     cfg: FederationConfig) -> SecureRoundOutcome:
    """Sample sites as the strategy does, run the five stages, return the averaged global model.

    Raises ``ConfigError`` when fewer than 3 sites were sampled (unless ``secagg-allow-two-sites``):
    that refusal comes before any site trains. Too many dropouts or a protocol violation fail the
    round cleanly instead (``outcome.arrays`` is None, the reason in ``outcome.failure``).
    """
    settings = cfg.secure
    configured = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    nodes = sorted({int(m.metadata.dst_node_id) for m in configured})
    _check_site_count(len(nodes), settings)
    current = arrays_to_numpy(arrays)
    # private parts (private-parts) are not in the sum: the sites keep them, the global keeps its values
    layout, weight_keys = masked_layout({k: v for k, v in current.items() if k not in strategy.private_keys},
                                        strategy.parameter_groups)
    try:
        config = SecAggConfig.create(nodes, layout, clip=settings.clip, weight_bound=settings.weight_bound,
                                     bits=settings.bits, threshold=settings.threshold or None,
                                     allow_two_sites=settings.allow_two_sites)
    except ValueError as err:
        raise ConfigError(f"secure aggregation, round {server_round}: {err}") from None
    row: dict[str, Any] = {f"{ROW_PREFIX}sites": len(nodes), f"{ROW_PREFIX}threshold": config.threshold,
                           f"{ROW_PREFIX}degree": config.degree, f"{ROW_PREFIX}failed": 0}
    outcome = SecureRoundOutcome(arrays=None, row=row)
    server = SecAggServer(config, layout)
    # Stage one carries the strategy's train message (the global model packed: common/packing.py) plus the
    # packing's slots, which the site's handler needs to read that model and its own update before masking.
    train_content = configured[0].content
    packing = PackLayout.of(current, strategy.parameter_groups)
    round_record = ConfigRecord({**config.to_record(), LAYOUT_KEY: layout.to_json(),
                                 WEIGHT_KEYS_KEY: json.dumps(weight_keys, sort_keys=True),
                                 PACKING_KEY: packing.to_json()})
    stage_one = RecordDict({ARRAYS_KEY: train_content[ARRAYS_KEY], CONFIG_KEY: train_content[CONFIG_KEY],
                            ROUND_KEY: round_record})
    try:
        replies = _exchange(grid, server_round, ACTION_ADVERTISE_KEYS, {n: stage_one for n in nodes},
                            timeout=cfg.round_timeout, strategy=strategy)
        refused, answered = split_refusals(server_round, replies.values())
        outcome.refusals = refused
        keys = _parse(answered, strategy, server_round, lambda m: AdvertisedKeys.from_dict(m.content[KEYS_KEY]))
        began = time.monotonic()
        broadcast = server.collect_keys(keys)
        outcome.participants = sorted(broadcast)
        row[f"{ROW_PREFIX}keys_advertised"] = len(broadcast)
        everyone = _context_record(config, {"nodes": sorted(broadcast),
                                            "encryption-keys": [broadcast[n].encryption_key for n in sorted(broadcast)],
                                            "mask-keys": [broadcast[n].mask_key for n in sorted(broadcast)],
                                            "site-ids": [broadcast[n].site_id for n in sorted(broadcast)],
                                            "signatures": [broadcast[n].signature for n in sorted(broadcast)]})
        replies = _exchange(grid, server_round, ACTION_SHARE_KEYS,
                            {n: RecordDict({KEYS_KEY: everyone}) for n in broadcast},
                            timeout=settings.timeout, strategy=strategy)
        bundles = _parse(replies.values(), strategy, server_round,
                         lambda m: bundles_from_dict(m.content[BUNDLES_KEY]))
        routed = server.route_shares(bundles)
        replies = _exchange(grid, server_round, ACTION_MASKED_INPUT,
                            {n: RecordDict({BUNDLES_KEY: _context_record(config, bundles_to_dict(routed[n]))})
                             for n in routed}, timeout=settings.timeout, strategy=strategy)
        vectors = _parse(replies.values(), strategy, server_round,
                         lambda m: decode_vector(m.content[MASKED_KEY][MASKED_ARRAY]))
        request = server.collect_masked_inputs(vectors)
        del vectors, replies  # masked vectors are in the running sum; nothing per site is kept
        request_record = RecordDict({REQUEST_KEY: _context_record(config, request.to_dict())})
        replies = _exchange(grid, server_round, ACTION_CONSISTENCY, {n: request_record for n in request.survivors},
                            timeout=settings.timeout, strategy=strategy)
        signed = _parse(replies.values(), strategy, server_round,
                        lambda m: bytes(m.content[SIGNATURE_KEY]["signature"]))
        signatures = ConfigRecord({"signers": sorted(signed), "signatures": [signed[n] for n in sorted(signed)]})
        unmask_record = RecordDict({REQUEST_KEY: _context_record(config, request.to_dict()),
                                    SIGNATURES_KEY: signatures})
        replies = _exchange(grid, server_round, ACTION_UNMASK, {n: unmask_record for n in signed},
                            timeout=settings.timeout, strategy=strategy)
        shares = _parse(replies.values(), strategy, server_round,
                        lambda m: UnmaskReply.from_dict(m.content[SHARES_KEY]))
        result = server.unmask(shares)
        row[f"{ROW_PREFIX}protocol_seconds"] = time.monotonic() - began
    except SecAggError as err:
        outcome.failure = str(err)
        row[f"{ROW_PREFIX}failed"] = 1
        log.warning("round %d: secure aggregation failed, the global model is unchanged: %s", server_round, err)
        strategy.rejected.append({"round": server_round, "phase": "secure-aggregation", "site": "(round)",
                                  "reason": str(err)})
        return outcome
    finally:
        for node, reason in sorted(server.rejected.items()):
            strategy.rejected.append({"round": server_round, "phase": "secure-aggregation", "site": str(node),
                                      "reason": reason})
    answered_unmask = len(set(shares) & set(result.survivors))
    row.update({f"{ROW_PREFIX}masked": len(result.survivors),
                f"{ROW_PREFIX}dropped_before_masking": len(result.dropped),
                f"{ROW_PREFIX}dropped_at_unmask": len(result.survivors) - answered_unmask,
                f"{ROW_PREFIX}recovered_dropouts": len(result.dropped) + len(result.survivors) - answered_unmask,
                "sites_trained": len(result.survivors)})
    new, metrics = apply_aggregate(current, result, settings.clip)
    if "clipped-fraction" in metrics:
        row[f"{ROW_PREFIX}clipped_fraction"] = metrics.pop("clipped-fraction")
    outcome.arrays, outcome.metrics = numpy_to_arrays(new), metrics
    log.info("round %d: secure sum of %d sites (threshold %d, %d dropouts recovered)", server_round,
             len(result.survivors), config.threshold, row[f"{ROW_PREFIX}recovered_dropouts"])
    return outcome


def apply_aggregate(current: Mapping[str, np.ndarray], result: AggregateResult,
                    clip: float) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """New global arrays ``current + sum(w * delta) / sum(w)`` per group, and the round's aggregates.

    A group no site in the sum has (weight sum 0) keeps its current values, as in plain
    modality-aware FedAvg; arrays outside the layout (integer buffers) are copied unchanged.
    """
    averages = result.averages()
    new: dict[str, np.ndarray] = {}
    for name, reference in current.items():
        if name in averages:
            new[name] = (reference.astype(np.float64) + averages[name]).astype(reference.dtype)
        else:
            new[name] = np.array(reference, copy=True)
    metrics: dict[str, float] = {}
    for group, total in sorted(result.weight_sums.items()):
        metrics[weight_key(group)] = round(float(total), 3)
    if CLIPPED_ENTRY in averages:
        metrics["clipped-fraction"] = float(np.clip(averages[CLIPPED_ENTRY][0] / clip, 0.0, 1.0))
    return new, metrics


def _check_site_count(count: int, settings: SecureAggregationSettings) -> None:
    if count < 2 or (count < MIN_SITES and not settings.allow_two_sites):
        raise ConfigError(
            f"secure aggregation needs at least {MIN_SITES} sites per round, {count} were sampled: "
            f"{TWO_SITES_HELP}. Add sites, or set secagg-allow-two-sites = true where that is acceptable "
            "(a test bed)" + (" (and never fewer than 2)" if count < 2 else "")
        )


def _context_record(config: SecAggConfig, values: Mapping[str, Any]) -> ConfigRecord:
    """A stage's ConfigRecord, tagged with the round's context id so a site never mixes rounds."""
    return ConfigRecord({CONTEXT_KEY: config.context, **values})


def _exchange(grid: Grid, server_round: int, action: str, contents: Mapping[int, RecordDict], *, timeout: float,
              strategy: ModalityAwareFedAvg) -> dict[int, Message]:
    """Send one stage's messages; return the replies without errors by node. Errors and silence are
    dropouts (logged, with the site's reason in the run's rejected replies)."""
    messages = [Message(content, dst_node_id=node, message_type=f"train.{action}", group_id=str(server_round))
                for node, content in sorted(contents.items())]
    # Stages 2-4 are answered in milliseconds: poll faster than for training, or polling dominates them.
    poll = DEFAULT_POLL_INTERVAL_S if action == ACTION_ADVERTISE_KEYS else KEY_STAGE_POLL_INTERVAL_S
    replies: dict[int, Message] = {}
    for reply in send_and_collect(grid, messages, timeout=timeout, poll_interval_s=poll):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            strategy.rejected.append({"round": server_round, "phase": f"secure-aggregation ({action})",
                                      "site": str(node), "reason": str(reply.error.reason)})
            continue
        replies[node] = reply
    missing = sorted(set(contents) - set(replies))
    if missing:
        log.warning("round %d: %d site(s) did not complete %s: %s", server_round, len(missing), action, missing)
    return replies


def _parse(replies: Iterable[Message], strategy: ModalityAwareFedAvg, server_round: int,
           parse: Callable[[Message], T]) -> dict[int, T]:
    """``parse`` each reply's content; a malformed reply counts as a dropout, never stops the round."""
    parsed: dict[int, T] = {}
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        try:
            parsed[node] = parse(reply)
        except (KeyError, TypeError, ValueError) as err:
            strategy.rejected.append({"round": server_round, "phase": "secure-aggregation", "site": str(node),
                                      "reason": f"malformed reply: {err!r}"})
    return parsed
