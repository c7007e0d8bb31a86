"""The site's side of secure aggregation: four ``train.secagg_*`` handlers and the plain-train guard.

With ``secure-aggregation = true`` the server sends four messages per round (see
:mod:`fedfusion.server.secure_aggregation`); this site answers them with public keys, ciphertexts
of its Shamir shares, its masked vector and, last, the shares the server needs to unmask the
*sum*. Its update itself never leaves unmasked: the masked vector is ``q(w * (x - global))`` plus
pairwise and self masks modulo 2^bits, uniformly random on its own.

Stage 1 trains through the very same function as a plain round (``train`` in
:mod:`fedfusion.client.app`: privacy policy, DP-SGD and the ε ledger included, so clip and noise
happen before masking), keeps the update at the site and answers with public keys only. A
refusal (privacy policy or budget) is answered as in a plain round: reason, no update.

State between stages: in deployment each message runs in a fresh process, so the round's secrets
(X25519 private keys, self-mask seed, the shares this site holds) live in Flower's ``context.state``,
which the SuperNode keeps per run at the site and never sends; the trained update, quantised, lives in a
private file at the site that the state names (:data:`STATE_UPDATE`: a model-sized vector in the state
would be serialised at every message). The update is deleted once masked (stage 3), everything once the
round ends at this site (stage 4, or any error), and stale state is dropped when the next round starts.

Against a malicious coordinator (:mod:`fedfusion.common.secagg.signing`): stage 1 refuses a round the
site's ``[secure-aggregation]`` policy forbids and signs the site's keys with its roster key; stage 2
verifies every peer against the roster; a fifth message, ``train.secagg_consistency``, signs the one
survivor set this site was told (once per round, and per :class:`~fedfusion.client.releases.AnswerBook`
only the set it vouched for before for the same study, round and global model); stage 4 reveals only
for that set and only when a majority of the round's sites signed it. No roster: refused.

A plain ``train`` message in a secure run is refused (:func:`refuse_unmasked_update`); a site can
also demand secure aggregation itself with the node-config key ``require-secure-aggregation``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedfusion.client.releases import ANSWERS_FILENAME, AnswerBook, answer_key
from fedfusion.client.secagg_identity import site_identity, truthy
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.flower_adapter import ClientAppCallable, ErrorCode, Mod
from fedfusion.common.packing import PackLayout, encode_vector, sent_layout
from fedfusion.common.personalization import shared_part
from fedfusion.common.records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    SITE_KEY,
    arrays_to_numpy,
    is_modality_count_key,
    modality_count,
    refusal_reason,
)
from fedfusion.common.secagg import (
    AdvertisedKeys,
    ProtocolViolation,
    SecAggClient,
    SecAggConfig,
    Stage,
    UnmaskRequest,
    VectorLayout,
    bundles_from_dict,
    bundles_to_dict,
)
from fedfusion.common.secagg.quantize import QuantizeResult
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
    WEIGHT_KEYS_KEY,
)
from fedfusion.common.secagg.signing import (
    advertisement_signature,
    check_round,
    request_digest,
    survivors_signature,
    verify_advertisements,
    verify_survivor_signatures,
)

log = logging.getLogger("fedfusion.client.secagg")

ConfigFn = Callable[[Context], tuple[FederationConfig, dict[str, Any]]]

#: Node-config key: this site sends updates only masked, whatever the run config says.
REQUIRE_NODE_KEY = "require-secure-aggregation"
#: TEST ONLY (run config, never declared in pyproject, so ``flwr run`` refuses it): comma-separated
#: ``site`` or ``site@round`` entries whose site answers stage 4 with an error, i.e. drops out after
#: sending its masked input.
TEST_DROP_AT_UNMASK_KEY = "test-secagg-drop-at-unmask"

STATE_CLIENT = "secagg-client"
"""context.state ConfigRecord: ``SecAggClient.to_state()`` (secrets; never sent)."""
STATE_UPDATE = "secagg-update"
"""context.state ConfigRecord naming the file that holds the trained update minus the global model, clipped,
weighted and quantised (:meth:`SecAggClient.encode`: one vector), not yet masked, until stage 3.

Why a file at the site and not the vector itself in ``context.state``: Flower serialises the state into and
out of the ClientApp for every message, so a model-sized vector kept there crossed the SuperNode four
times between stage 1 and stage 3 (most of a secure round's cost at 10M parameters). The file lies in a
private folder beside the site's audit log (:func:`pending_update_dir`), is named by run, node and the
round's random context id, and is deleted once masked, when the round fails, or when the next round starts."""
PENDING_DIR = "secagg-pending"
STATE_ROUND = "secagg-round-info"
"""context.state ConfigRecord: this site's per-group weights (example counts), site id and round."""
_STATE_KEYS = (STATE_CLIENT, STATE_UPDATE, STATE_ROUND)
STATE_ANSWERS = "secagg-answers"
"""context.state ConfigRecord: the answer book when the node config names no audit log (simulation, tests)."""


def refuse_unmasked_update(config_fn: ConfigFn) -> Mod:
    """A mod for the plain ``train`` handler: in a secure run (or at a site that requires it) a
    plain train request is answered with an error and nothing is trained or sent."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        cfg, _ = config_fn(context)
        if cfg.secure.enabled or truthy(context.node_config.get(REQUIRE_NODE_KEY, False)):
            why = "secure-aggregation = true in this run" if cfg.secure.enabled else \
                f"this site's node config sets {REQUIRE_NODE_KEY}"
            return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION,
                                 f"refused: {why}, so this site never sends its update unmasked; the server must "
                                 f"use the secure-aggregation stages (train.{ACTION_ADVERTISE_KEYS} ...), not a "
                                 "plain train message"), reply_to=msg)
        return call_next(msg, context)

    return mod


def register_secure_aggregation(app: ClientApp, train: ClientAppCallable, config_fn: ConfigFn) -> None:
    """Register the four stage handlers on ``app``; ``train`` is the site's plain training function
    (called in stage 1 without the plain handler's mods), ``config_fn`` parses the run config."""

    @app.train(ACTION_ADVERTISE_KEYS)
    def advertise_keys(msg: Message, context: Context) -> Message:
        return _guarded(msg, context, "advertise keys",
                        lambda: handle_advertise_keys(msg, context, train, config_fn(context)))

    @app.train(ACTION_SHARE_KEYS)
    def share_keys(msg: Message, context: Context) -> Message:
        return _guarded(msg, context, "share keys", lambda: handle_share_keys(msg, context, config_fn(context)[1]))

    @app.train(ACTION_MASKED_INPUT)
    def masked_input(msg: Message, context: Context) -> Message:
        return _guarded(msg, context, "masked input", lambda: handle_masked_input(msg, context))

    @app.train(ACTION_CONSISTENCY)
    def consistency(msg: Message, context: Context) -> Message:
        return _guarded(msg, context, "consistency", lambda: handle_consistency(msg, context, config_fn(context)[1]))

    @app.train(ACTION_UNMASK)
    def unmask(msg: Message, context: Context) -> Message:
        return _guarded(msg, context, "unmask", lambda: handle_unmask(msg, context, config_fn(context)[1]))


def handle_advertise_keys(msg: Message, context: Context, train: ClientAppCallable,
                          configs: tuple[FederationConfig, dict[str, Any]]) -> Message:
    """Stage 1: check the round against this site's roster and policy, train, keep the update here,
    answer with public keys signed by this site (bound to its site id, node id, the round and roster)."""
    clear_state(context)
    _sweep_updates(context)  # a round that failed in a process that no longer exists may have left its file
    cfg, run_config = configs
    identity = site_identity(context.node_config, run_config)  # no roster: refuse before training
    record = msg.content[ROUND_KEY]
    config = SecAggConfig.from_record(record)
    check_round(config, identity.policy)
    layout = VectorLayout.from_json(str(record[LAYOUT_KEY]))
    weight_keys = json.loads(str(record[WEIGHT_KEYS_KEY]))
    packing = _sent_packing(msg)
    received = (packing.unpack(msg.content[ARRAYS_KEY], packing.sha256) if packing is not None
                else arrays_to_numpy(msg.content[ARRAYS_KEY]))
    # the site's private parts (private-parts) are neither masked nor sent: the layout covers the shared part
    current = shared_part(received, cfg.personal.private_parts)
    check_layout(layout, weight_keys, current)
    node_id = int(msg.metadata.dst_node_id)
    client = SecAggClient(node_id, config, layout)  # refuses a layout or node set it cannot serve, before training
    reply = train(msg, context)  # checks the packing's hash against this site's own model before training
    if reply.has_error() or refusal_reason(reply) is not None:
        return reply  # an error or a privacy refusal carries no update
    trained = _trained_state(reply, packing, current)
    metrics = reply.content[METRICS_KEY]
    # a shared multi-sequence image encoder has no count of its own: modality_count sums its sequences'
    weights = {group: float(metrics.get(key, 0.0)) if key == NUM_EXAMPLES else modality_count(metrics, group)
               for group, key in weight_keys.items()}
    for group, weight in weights.items():
        if weight > config.weight_bound:
            raise ValueError(f"this site reports {weight:g} examples for '{group}', above the run's "
                             f"secagg-weight-bound ({config.weight_bound:g}); the coordinator must raise it")
    names = [entry.name for entry in layout.entries if entry.name != CLIPPED_ENTRY]
    delta = {name: trained[name].astype(np.float64) - current[name].astype(np.float64) for name in names}
    fraction = clipped_fraction(delta, weights, config, layout)
    delta[CLIPPED_ENTRY] = np.array([fraction * config.clip])
    encoded = client.encode(delta, weights)  # kept quantised, one vector, until stage 3 masks it
    del delta, trained
    keys = client.advertise_keys()
    keys = AdvertisedKeys(keys.encryption_key, keys.mask_key, identity.site_id,
                          advertisement_signature(identity.key, identity.site_id, node_id, keys, config,
                                                  identity.roster))
    server_round = int(msg.content[CONFIG_KEY].get("server-round", 0))
    site = reply.content.config_records.get(SITE_KEY)
    context.state[STATE_UPDATE] = ConfigRecord({"file": str(_keep_update(context, config, encoded.values)),
                                                "length": int(encoded.values.size),
                                                "dtype": str(encoded.values.dtype)})
    context.state[STATE_ROUND] = ConfigRecord({
        "weights": json.dumps(weights, sort_keys=True),
        "clipped": encoded.clipped,
        "clipped-fraction": fraction,
        "site-id": str(site.get("site-id", node_id)) if site is not None else str(node_id),  # the data's site
        "server-round": server_round,
        "answer-key": answer_key(identity.site_id, cfg.study or cfg.schema, server_round, current),
    })
    _save(context, client)
    return Message(RecordDict({KEYS_KEY: ConfigRecord(keys.to_dict())}), reply_to=msg)


def handle_share_keys(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    """Stage 2: verify every advertised key against the roster, then Shamir-share this round's secrets
    among the neighbours that advertised keys."""
    client = _load(context)
    record = msg.content[KEYS_KEY]
    _check_context(record, client)
    nodes, enc, mask = record["nodes"], record["encryption-keys"], record["mask-keys"]
    site_ids, signatures = record.get("site-ids", [""] * len(nodes)), record.get("signatures", [b""] * len(nodes))
    keys = {int(n): AdvertisedKeys(bytes(e), bytes(m), str(i), bytes(g))
            for n, e, m, i, g in zip(nodes, enc, mask, site_ids, signatures, strict=True)}
    identity = site_identity(context.node_config, run_config)
    sites = verify_advertisements(identity.roster, client.config, keys, client.node_id, identity.site_id,
                                  identity.policy)
    _update_round(context, sites=json.dumps({str(n): s for n, s in sites.items()}, sort_keys=True))
    bundles = client.share_keys(keys)
    _save(context, client)
    return Message(RecordDict({BUNDLES_KEY: ConfigRecord(bundles_to_dict(bundles))}), reply_to=msg)


def handle_masked_input(msg: Message, context: Context) -> Message:
    """Stage 3: store the neighbours' shares, mask the kept update, delete it, send the masked vector."""
    client = _load(context)
    record = msg.content[BUNDLES_KEY]
    _check_context(record, client)
    bundles = bundles_from_dict({k: v for k, v in record.items() if k != CONTEXT_KEY})
    if STATE_UPDATE not in context.state or STATE_ROUND not in context.state:
        raise ProtocolViolation("no trained update is kept for this round (the site restarted since stage 1)")
    info = context.state[STATE_ROUND]
    encoded = QuantizeResult(_kept_update(context.state[STATE_UPDATE]), int(info.get("clipped", 0)))
    masked = client.masked_encoded(bundles, encoded)
    _forget_update(context)  # the update exists only masked from here on
    _save(context, client)
    if masked.clipped:
        log.info("round %s: %d update entries clipped to ±%g before masking (fraction %.2e)",
                 info.get("server-round"), masked.clipped, client.config.clip, float(info.get("clipped-fraction", 0)))
    return Message(RecordDict({MASKED_KEY: ArrayRecord({MASKED_ARRAY: encode_vector(masked.vector)})}), reply_to=msg)


def handle_consistency(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    """Consistency round: sign the one unmask request this site was told, once per round, and only for
    the survivor set it already vouched for if the same update was asked for before (:class:`AnswerBook`)."""
    client = _load(context)
    if client.stage is not Stage.UNMASK:
        raise ProtocolViolation(f"a consistency request in stage {client.stage.name} (before this site's masked input)")
    record = msg.content[REQUEST_KEY]
    _check_context(record, client)
    request = UnmaskRequest.from_dict(record)
    info = context.state[STATE_ROUND]
    if "signed-request" in info:
        raise ProtocolViolation("a second consistency request in one round: this site signs one survivor set only")
    sites = {int(n): s for n, s in json.loads(str(info.get("sites", "{}"))).items()}
    named = set(request.survivors) | set(request.dropped)
    both = set(request.survivors) & set(request.dropped)
    if not named <= set(sites) or client.node_id not in request.survivors or both:
        raise ProtocolViolation("the unmask request names unattested nodes, both survives and drops a node, or "
                                "leaves this site out")
    survivor_sites = json.dumps(sorted(sites[n] for n in request.survivors))
    book = _answer_book(context)
    if not book.bind(str(info["answer-key"]), survivor_sites):
        raise ProtocolViolation("this site already answered this round (same study, round and global model) for "
                                "another survivor set; a second sum of the same update would reveal differences")
    _save_book(context, book)
    identity = site_identity(context.node_config, run_config)
    _update_round(context, **{"signed-request": request_digest(client.config, request).hex()})
    signature = survivors_signature(identity.key, client.config, request)
    return Message(RecordDict({SIGNATURE_KEY: ConfigRecord({CONTEXT_KEY: client.config.context,
                                                            "signature": signature})}), reply_to=msg)


def handle_unmask(msg: Message, context: Context, run_config: Mapping[str, Any]) -> Message:
    """Stage 4: reveal, per node, the one share the request allows, only for the request this site signed
    and only when a majority of the round's sites signed the same one; then forget the round."""
    client = _load(context)
    info = context.state.get(STATE_ROUND)
    if info is not None and _test_drop(run_config, str(info.get("site-id")), int(info.get("server-round", 0))):
        clear_state(context)
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             f"test hook {TEST_DROP_AT_UNMASK_KEY}: simulated dropout before unmasking"), reply_to=msg)
    record = msg.content[REQUEST_KEY]
    _check_context(record, client)
    request = UnmaskRequest.from_dict(record)
    if client.stage is not Stage.UNMASK:
        raise ProtocolViolation(f"called for stage UNMASK while in stage {client.stage.name}")
    if info is None or str(info.get("signed-request", "")) != request_digest(client.config, request).hex():
        raise ProtocolViolation("the unmask request differs from the survivor set this site signed")
    signed = msg.content[SIGNATURES_KEY]
    signatures = {int(n): bytes(g) for n, g in zip(signed["signers"], signed["signatures"], strict=True)}
    sites = {int(n): s for n, s in json.loads(str(info["sites"])).items()}
    identity = site_identity(context.node_config, run_config)
    verify_survivor_signatures(identity.roster, client.config, request, sites, signatures)
    reply = client.unmask(request)
    clear_state(context)
    return Message(RecordDict({SHARES_KEY: ConfigRecord(reply.to_dict())}), reply_to=msg)


def _sent_packing(msg: Message) -> PackLayout | None:
    """The packing of stage one's global model (None: sent per tensor), from the slots the coordinator sent,
    accepted only when they hash to the layout its train config names (common/packing.py)."""
    config = msg.content.config_records.get(CONFIG_KEY)
    if sent_layout(config) is None:
        return None
    slots = msg.content[ROUND_KEY].get(PACKING_KEY)
    if slots is None:
        raise ProtocolViolation("stage one sent a packed model without its packing slots")
    return PackLayout.from_json(str(slots), sent_layout(config))


def _trained_state(reply: Message, packing: PackLayout | None,
                   current: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trained weights of this site's train reply (packed when it was asked packed: the shared part of
    ``packing``, the layout the reply names)."""
    arrays = reply.content[ARRAYS_KEY]
    if packing is None:
        return arrays_to_numpy(arrays)
    site = reply.content.config_records.get(SITE_KEY)
    return packing.subset(current).unpack(arrays, sent_layout(site))


def check_layout(layout: VectorLayout, weight_keys: Mapping[str, str], current: Mapping[str, np.ndarray]) -> None:
    """The server's layout must cover exactly this model's float arrays (plus the clipped-fraction
    slot) with their shapes, and weigh groups by example counts only."""
    floats = {name: value.shape for name, value in current.items() if np.issubdtype(value.dtype, np.floating)}
    entries = {entry.name: entry.shape for entry in layout.entries}
    expected = {**floats, CLIPPED_ENTRY: (1,)}
    if entries != expected:
        differ = sorted(set(entries).symmetric_difference(expected)) or sorted(
            name for name in entries if entries[name] != expected[name])
        raise ProtocolViolation(f"the secure-aggregation layout does not match the global model: {differ[:5]}")
    by_counts = all(k == NUM_EXAMPLES or is_modality_count_key(k) for k in weight_keys.values())
    if set(weight_keys) != set(layout.groups) or not by_counts:
        raise ProtocolViolation(f"groups must be weighted by example counts, got {dict(weight_keys)}")


def clipped_fraction(update: Mapping[str, np.ndarray], weights: Mapping[str, float], config: SecAggConfig,
                     layout: VectorLayout) -> float:
    """Fraction of the entries this site contributes (groups with weight > 0) outside ``[-clip, clip]``."""
    clipped = total = 0
    for entry in layout.entries:
        if entry.name == CLIPPED_ENTRY or weights.get(entry.group, 0.0) <= 0:
            continue
        values = update[entry.name]
        clipped += int(np.count_nonzero(np.abs(values) > config.clip))
        total += values.size
    return clipped / total if total else 0.0


def pending_update_dir(context: Context) -> Path:
    """Where a site keeps its quantised update between stage 1 and stage 3: beside its audit log (its state
    folder) in deployment, else a per-user temporary folder (simulation, tests). Created private (0700)."""
    audit = context.node_config.get("audit-log")
    user = os.getuid() if hasattr(os, "getuid") else "user"
    base = Path(str(audit)).parent if audit else Path(tempfile.gettempdir()) / f"fedfusion-{user}"
    folder = base / PENDING_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _update_prefix(context: Context) -> str:
    return f"run{context.run_id}-node{context.node_id}-"


def _keep_update(context: Context, config: SecAggConfig, values: np.ndarray) -> Path:
    """Write the encoded vector to a new private file (atomically) and return its path."""
    folder = pending_update_dir(context)
    path = folder / f"{_update_prefix(context)}{config.context.hex()[:32]}.npy"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, values, allow_pickle=False)
    os.replace(tmp, path)
    return path


def _kept_update(record: Mapping[str, Any]) -> np.ndarray:
    """The encoded vector stage 1 kept; one of the length and dtype stage 1 wrote, or a clear refusal."""
    path = Path(str(record["file"]))
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ProtocolViolation(f"the update this site kept for this round is gone or unreadable ({path}: "
                                f"{err})") from None
    if values.shape != (int(record["length"]),) or str(values.dtype) != str(record["dtype"]):
        raise ProtocolViolation(f"{path} does not hold the update this site kept ({values.dtype}{list(values.shape)})")
    return values


def _forget_update(context: Context) -> None:
    """Delete the kept update's file and its state entry."""
    record = context.state.get(STATE_UPDATE)
    if record is not None:
        Path(str(record.get("file", ""))).unlink(missing_ok=True)
        del context.state[STATE_UPDATE]


def _sweep_updates(context: Context) -> None:
    """Delete every kept update of this run and node: a round that ended without reaching stage 3 in a process
    that no longer exists (its state gone with it) may have left its file."""
    for stale in pending_update_dir(context).glob(f"{_update_prefix(context)}*"):
        stale.unlink(missing_ok=True)


def clear_state(context: Context) -> None:
    """Forget the round: secrets, held shares and any kept update (its file too)."""
    _forget_update(context)
    for key in _STATE_KEYS:
        if key in context.state:
            del context.state[key]


def _update_round(context: Context, **values: Any) -> None:
    info = context.state[STATE_ROUND]
    context.state[STATE_ROUND] = ConfigRecord({**dict(info), **values})


def _answer_book(context: Context) -> AnswerBook:
    """The site's persistent book beside its audit log (deployment), else kept in ``context.state``."""
    audit = context.node_config.get("audit-log")
    if audit:
        return AnswerBook(Path(str(audit)).with_name(ANSWERS_FILENAME))
    stored = context.state.get(STATE_ANSWERS)
    return AnswerBook(None, {str(k): str(v) for k, v in dict(stored).items()} if stored is not None else None)


def _save_book(context: Context, book: AnswerBook) -> None:
    if book.path is None:
        context.state[STATE_ANSWERS] = ConfigRecord(dict(book.entries))


def _save(context: Context, client: SecAggClient) -> None:
    context.state[STATE_CLIENT] = ConfigRecord(client.to_state())


def _load(context: Context) -> SecAggClient:
    if STATE_CLIENT not in context.state:
        raise ProtocolViolation("no secure-aggregation state for this round here (the site restarted, or the "
                                "server skipped a stage)")
    return SecAggClient.from_state(context.state[STATE_CLIENT])


def _check_context(record: Mapping[str, Any], client: SecAggClient) -> None:
    if bytes(record.get(CONTEXT_KEY, b"")) != client.config.context:
        raise ProtocolViolation("this message belongs to another secure-aggregation round")


def _guarded(msg: Message, context: Context, stage: str, handle: Callable[[], Message]) -> Message:
    """Run a stage; on any failure forget the round (a site that failed answers nothing more in it)
    and answer with the reason, which holds no values."""
    try:
        return handle()
    except Exception as err:  # noqa: BLE001 - every failure must clear the secrets first
        clear_state(context)
        log.warning("secure aggregation (%s) failed at this site: %s", stage, err)
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             f"secure aggregation ({stage}): {type(err).__name__}: {err}"), reply_to=msg)


def _test_drop(run_config: Mapping[str, Any], site: str, server_round: int) -> bool:
    for entry in str(run_config.get(TEST_DROP_AT_UNMASK_KEY, "") or "").split(","):
        name, _, at = entry.strip().partition("@")
        if name and name == site and (not at or int(at) == server_round):
            return True
    return False

