"""The test plays a malicious coordinator against the real site handlers (client/secure_aggregation.py on
real Flower Messages, serialised as a SuperNode would): invented sites, re-labelled node ids, replay of a
round with another site set, different survivor sets for different sites on a sparse graph, a lowered
degree or threshold, two-site rounds asked for by the server, and a site without a roster. Each time the
site refuses with an error reply and the attacker ends up without what it needs to isolate an update."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedfusion.common.records import ARRAYS_KEY, CONFIG_KEY, numpy_to_arrays
from fedfusion.common.roster import sign
from fedfusion.common.secagg import (
    AdvertisedKeys,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    UnmaskReply,
    UnmaskRequest,
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
    MASKED_KEY,
    REQUEST_KEY,
    ROUND_KEY,
    SHARES_KEY,
    SIGNATURE_KEY,
    SIGNATURES_KEY,
    WEIGHT_KEYS_KEY,
)
from fedfusion.common.secagg.signing import PURPOSE_ADVERTISE, advertisement_payload
from fedfusion.common.secagg.testbed import new_signing_key
from fedfusion.server.secure_aggregation import apply_aggregate, masked_layout
from tests.secagg_fakes import (
    PARAMETER_GROUPS,
    TESTBED_SITES,
    broadcast_record,
    global_model,
    identity_config,
    make_app,
    make_sites,
    roundtrip,
)

RUN = {"secure-aggregation": True, "secagg-weight-bound": 1000.0}


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime


class Sites:
    """Real sites (one letter each), each a ClientApp plus the state its SuperNode keeps between messages."""

    def __init__(self, count: int, *, policy: dict[str, Any] | None = None, state_dir: Path | None = None,
                 first_node: int = 101):
        self.nodes = list(range(first_node, first_node + count))
        self.fake = dict(zip(self.nodes, make_sites(TESTBED_SITES[:count], seed=11), strict=True))
        self.app = make_app(self.fake, RUN)
        self.states = {n: RecordDict() for n in self.nodes}
        self.configs = {n: {**identity_config(self.fake[n].name, **(policy or {})),
                            **({"audit-log": str(state_dir / self.fake[n].name / "audit.jsonl")} if state_dir else {})}
                        for n in self.nodes}

    def send(self, node: int, action: str, content: RecordDict) -> Message:
        msg = Message(roundtrip(content), dst_node_id=node, message_type=f"train.{action}", group_id="1")
        msg.metadata.__dict__["_message_id"] = "m"
        context = Context(run_id=1, node_id=node, node_config=self.configs[node], state=roundtrip(self.states[node]),
                          run_config={})
        reply = self.app(msg, context)
        self.states[node] = roundtrip(context.state)
        return Message(roundtrip(reply.content), reply_to=msg) if reply.has_content() else reply


def _round(nodes: list[int], **create: Any) -> tuple[SecAggConfig, RecordDict]:
    current = global_model()
    layout, weight_keys = masked_layout(current, PARAMETER_GROUPS)
    config = SecAggConfig.create(sorted(nodes), layout, clip=1.0, weight_bound=1000.0, **create)
    record = ConfigRecord({**config.to_record(), LAYOUT_KEY: layout.to_json(),
                           WEIGHT_KEYS_KEY: json.dumps(weight_keys)})
    return config, RecordDict({ARRAYS_KEY: numpy_to_arrays(current), CONFIG_KEY: ConfigRecord({"server-round": 1}),
                               ROUND_KEY: record})


def _advertise(sites: Sites, nodes: list[int], content: RecordDict) -> dict[int, Message]:
    return {n: sites.send(n, ACTION_ADVERTISE_KEYS, content) for n in nodes}


def _keys(replies: dict[int, Message]) -> dict[int, AdvertisedKeys]:
    return {n: AdvertisedKeys.from_dict(r.content[KEYS_KEY]) for n, r in replies.items() if not r.has_error()}


def _refused(reply: Message, why: str) -> None:
    assert reply.has_error(), reply.content
    assert why in reply.error.reason, reply.error.reason


def _honest_until_request(sites: Sites, nodes: list[int], config: SecAggConfig, content: RecordDict,
                          server: SecAggServer) -> UnmaskRequest:
    broadcast = server.collect_keys(_keys(_advertise(sites, nodes, content)))
    everyone = RecordDict({KEYS_KEY: broadcast_record(config, broadcast)})
    shared = {n: sites.send(n, ACTION_SHARE_KEYS, everyone) for n in nodes}
    routed = server.route_shares({n: bundles_from_dict(r.content[BUNDLES_KEY]) for n, r in shared.items()})
    masked = {n: sites.send(n, ACTION_MASKED_INPUT, RecordDict({BUNDLES_KEY: ConfigRecord(
        {CONTEXT_KEY: config.context, **bundles_to_dict(routed[n])})})) for n in nodes}
    return server.collect_masked_inputs({n: r.content[MASKED_KEY]["masked-input"].numpy() for n, r in masked.items()})


def _sign_and_unmask(sites: Sites, config: SecAggConfig, views: dict[int, UnmaskRequest]) -> dict[int, Message]:
    """Consistency round then unmask; ``views`` is the request each site is told (the attacker may vary it),
    and each site is shown every signature made over the request it was told."""
    records = {n: ConfigRecord({CONTEXT_KEY: config.context, **request.to_dict()}) for n, request in views.items()}
    signed = {n: sites.send(n, ACTION_CONSISTENCY, RecordDict({REQUEST_KEY: records[n]})) for n in views}
    replies = {}
    for n, request in views.items():
        signers = sorted(m for m, r in signed.items() if not r.has_error() and views[m] == request)
        signatures = ConfigRecord({"signers": signers,
                                   "signatures": [signed[m].content[SIGNATURE_KEY]["signature"] for m in signers]})
        replies[n] = sites.send(n, ACTION_UNMASK, RecordDict({REQUEST_KEY: records[n], SIGNATURES_KEY: signatures}))
    return {"signed": signed, "unmask": replies}  # type: ignore[return-value]


def test_invented_sites_are_refused_before_any_share_or_masked_input() -> None:
    sites = Sites(1)
    victim, fake_b, fake_c = sites.nodes[0], 900, 901
    config, content = _round([victim, fake_b, fake_c])
    layout, _ = masked_layout(global_model(), PARAMETER_GROUPS)
    victim_keys = _keys(_advertise(sites, [victim], content))[victim]
    attacker = {n: SecAggClient(n, config, layout) for n in (fake_b, fake_c)}
    played = {n: c.advertise_keys() for n, c in attacker.items()}
    own_key = new_signing_key()  # the coordinator's own key: not on the roster under "B"
    forged = {n: AdvertisedKeys(k.encryption_key, k.mask_key, name, sign(own_key, PURPOSE_ADVERTISE,
                                advertisement_payload(name, n, k, config, "any")))
              for (n, k), name in zip(played.items(), ("B", "C"), strict=True)}
    cases = {"are not signed": played,
             "no valid signature of site 'B'": forged,
             "not on this site's roster": {n: AdvertisedKeys(k.encryption_key, k.mask_key, "mallory", b"sig")
                                           for n, k in played.items()},
             # the victim's own signed entry replayed under a second node id (the signature binds the node id)
             "no valid signature of site 'A'": {fake_b: victim_keys, fake_c: forged[fake_c]}}
    for why, fake in cases.items():
        sites.states[victim] = RecordDict()
        victim_keys = _keys(_advertise(sites, [victim], content))[victim]
        if why == "no valid signature of site 'A'":
            fake = {fake_b: victim_keys, fake_c: forged[fake_c]}
        reply = sites.send(victim, ACTION_SHARE_KEYS,
                           RecordDict({KEYS_KEY: broadcast_record(config, {victim: victim_keys, **fake})}))
        _refused(reply, why)
        assert not sites.states[victim].keys(), "the site forgets the round: no update or secret is kept"
        # the attacker carries on as if the site had shared: the site has nothing left to mask or reveal
        reply = sites.send(victim, ACTION_MASKED_INPUT, RecordDict({BUNDLES_KEY: ConfigRecord(
            {CONTEXT_KEY: config.context})}))
        _refused(reply, "no secure-aggregation state")
        assert MASKED_KEY not in (reply.content.keys() if reply.has_content() else ())


def test_a_node_id_relabelled_by_the_server_is_refused() -> None:
    sites = Sites(3)
    config, content = _round(sites.nodes)
    keys = _keys(_advertise(sites, sites.nodes, content))
    a, b, c = sites.nodes
    swapped = {a: keys[a], b: keys[c], c: keys[b]}  # the same signed entries under each other's node ids
    reply = sites.send(a, ACTION_SHARE_KEYS, RecordDict({KEYS_KEY: broadcast_record(config, swapped)}))
    _refused(reply, "no valid signature of site")


def test_replay_of_a_round_with_another_site_set_is_refused(tmp_path: Path) -> None:
    sites = Sites(4, state_dir=tmp_path)  # answer books beside each site's audit log: they outlive the run
    config, content = _round(sites.nodes)
    server = SecAggServer(config, masked_layout(global_model(), PARAMETER_GROUPS)[0])
    request = _honest_until_request(sites, sites.nodes, config, content, server)
    first = _sign_and_unmask(sites, config, {n: request for n in sites.nodes})["unmask"]
    whole = server.unmask({n: UnmaskReply.from_dict(r.content[SHARES_KEY]) for n, r in first.items()})
    # the same round (same global model) again without site A, in a new run (fresh SuperNode state)
    others = sites.nodes[1:]
    sites.states = {n: RecordDict() for n in sites.nodes}
    config2, content2 = _round(others)
    server2 = SecAggServer(config2, masked_layout(global_model(), PARAMETER_GROUPS)[0])
    request2 = _honest_until_request(sites, others, config2, content2, server2)
    assert all(sites.fake[n].trained == 2 for n in others)  # the same (deterministic) update was masked again
    second = _sign_and_unmask(sites, config2, {n: request2 for n in others})
    for n in others:
        _refused(second["signed"][n], "already answered this round")
        _refused(second["unmask"][n], "no secure-aggregation state")  # the refusal forgot the round
    assert not [r for r in second["unmask"].values() if not r.has_error()], "no share of the second sum was revealed"
    # with no second sum, the attacker's best estimate of A is the 4-site mean, not A's update
    current = global_model()
    mean, _ = apply_aggregate(current, whole, clip=1.0)
    victim = sites.fake[sites.nodes[0]].delta["fusion.w"]
    assert np.abs((mean["fusion.w"] - current["fusion.w"]) - victim).max() > 0.01
    # an honest coordinator that resumes with the same sites is still answered
    sites.states = {n: RecordDict() for n in sites.nodes}
    server3 = SecAggServer(config, masked_layout(global_model(), PARAMETER_GROUPS)[0])
    config3, content3 = _round(sites.nodes)
    server3 = SecAggServer(config3, masked_layout(global_model(), PARAMETER_GROUPS)[0])
    request3 = _honest_until_request(sites, sites.nodes, config3, content3, server3)
    third = _sign_and_unmask(sites, config3, {n: request3 for n in sites.nodes})["unmask"]
    again = server3.unmask({n: UnmaskReply.from_dict(r.content[SHARES_KEY]) for n, r in third.items()})
    np.testing.assert_allclose(again.sums["fusion.w"], whole.sums["fusion.w"], atol=1e-4)


def _per_site_views(config: SecAggConfig, victim: int) -> dict[int, UnmaskRequest]:
    """The inconsistent-views attack: each neighbour h of the victim is told that the victim and h survived
    and the victim's other neighbours dropped (so h reveals the victim's self-mask share *and* shares of
    its neighbours' mask keys); the other sites are told the victim survived and all its neighbours dropped.
    Each view alone passes every single-request check."""
    neighbours = config.neighbours[victim]
    rest = [n for n in config.node_ids if n not in neighbours and n != victim]
    views = {n: UnmaskRequest(tuple(sorted({victim, *rest})), tuple(sorted(neighbours))) for n in [victim, *rest]}
    for h in neighbours:
        views[h] = UnmaskRequest(tuple(sorted({victim, h, *rest})), tuple(sorted(neighbours - {h})))
    return views


def _unmask_victim(config: SecAggConfig, layout: Any, victim: int, masked: np.ndarray, victim_keys: AdvertisedKeys,
                   replies: dict[int, UnmaskReply]) -> dict[str, np.ndarray] | None:
    """The attacker's reconstruction of the victim's own (weighted) update from its masked vector, or None
    when it lacks ``threshold`` shares of the victim's self-mask seed or of any neighbour's mask key."""
    from fedfusion.common.secagg.keys import PURPOSE_MASK, KeyPair, derive_pairwise_seed
    from fedfusion.common.secagg.masking import add_masks, pairwise_sign
    from fedfusion.common.secagg.shamir import Share, combine_secret

    def secret(node: int, kind: str) -> bytes | None:
        shares = [Share.from_bytes((r.self_mask_shares if kind == "b" else r.mask_key_shares)[node])
                  for r in replies.values() if node in (r.self_mask_shares if kind == "b" else r.mask_key_shares)]
        return combine_secret(shares[:config.threshold]) if len(shares) >= config.threshold else None

    self_seed = secret(victim, "b")
    keys = {j: secret(j, "s") for j in config.neighbours[victim]}
    if self_seed is None or any(k is None for k in keys.values()):
        return None
    masks = [(self_seed, -1)]
    for j, raw in sorted(keys.items()):
        seed = derive_pairwise_seed(KeyPair.from_private_bytes(raw), victim_keys.mask_key, j, victim, config.context,
                                    PURPOSE_MASK)
        masks.append((seed, -pairwise_sign(victim, j)))
    total = masked.copy()
    add_masks(total, masks, config.bits)
    sums, weights = config.encoder(layout).decode_sum(total, 1)
    return {name: value / weights["shared"] for name, value in sums.items() if name == "fusion.w"}


def test_different_survivor_sets_for_different_sites_on_a_sparse_graph_are_refused() -> None:
    """Default settings at 30 sites (degree 16, threshold 12: a sparse graph). Against the bare state
    machine (no consistency round) the per-site views recover the victim's update exactly; against the
    site handlers every site refuses and the attacker holds no secret it needs."""
    sites = Sites(30)
    config, content = _round(sites.nodes)
    layout = masked_layout(global_model(), PARAMETER_GROUPS)[0]
    assert config.degree < len(sites.nodes) - 1
    victim = sites.nodes[0]
    views = _per_site_views(config, victim)
    truth = sites.fake[victim].delta["fusion.w"]

    # 1. the attack is real: the unsigned state machine alone answers each view and leaks the update
    clients = {n: SecAggClient(n, config, layout) for n in sites.nodes}
    advertised = {n: c.advertise_keys() for n, c in clients.items()}
    bundles = {n: c.share_keys(advertised) for n, c in clients.items()}
    routed = {n: {s: b[n] for s, b in bundles.items() if n in b} for n in sites.nodes}
    weights = {n: {g: sites.fake[n].counts["num-examples"] for g in layout.groups} for n in sites.nodes}
    names = {e.name for e in layout.entries}
    updates = {n: {**{k: v for k, v in sites.fake[n].delta.items() if k in names}, CLIPPED_ENTRY: np.zeros(1)}
               for n in sites.nodes}
    masked = {n: clients[n].masked_input(routed[n], updates[n], weights[n]).vector for n in sites.nodes}
    leaked = _unmask_victim(config, layout, victim, masked[victim], advertised[victim],
                            {n: clients[n].unmask(views[n]) for n in sites.nodes})
    assert leaked is not None
    np.testing.assert_allclose(leaked["fusion.w"], truth, atol=1e-4)

    # 2. the site handlers: the same views after the consistency round
    server = SecAggServer(config, layout)
    honest = _honest_until_request(sites, sites.nodes, config, content, server)
    assert honest.survivors == tuple(sites.nodes)
    out = _sign_and_unmask(sites, config, views)
    for n in sites.nodes:  # no view was signed by a majority of the 30 sites
        _refused(out["unmask"][n], "consistency check")
    revealed = {n: UnmaskReply.from_dict(r.content[SHARES_KEY]) for n, r in out["unmask"].items()
                if not r.has_error()}
    keys = _keys({n: Message(RecordDict({KEYS_KEY: ConfigRecord(advertised[n].to_dict())}), dst_node_id=n,
                             message_type="train") for n in [victim]})
    assert _unmask_victim(config, layout, victim, masked[victim], keys[victim], revealed) is None


def test_majority_signatures_forwarded_with_another_request_do_not_count() -> None:
    sites = Sites(5)
    config, content = _round(sites.nodes)
    server = SecAggServer(config, masked_layout(global_model(), PARAMETER_GROUPS)[0])
    honest = _honest_until_request(sites, sites.nodes, config, content, server)
    records = ConfigRecord({CONTEXT_KEY: config.context, **honest.to_dict()})
    signed = {n: sites.send(n, ACTION_CONSISTENCY, RecordDict({REQUEST_KEY: records})) for n in sites.nodes}
    signatures = ConfigRecord({"signers": sites.nodes, "signatures": [signed[n].content[SIGNATURE_KEY]["signature"]
                                                                      for n in sites.nodes]})
    other = UnmaskRequest(tuple(sites.nodes[:4]), (sites.nodes[4],))
    reply = sites.send(sites.nodes[0], ACTION_UNMASK, RecordDict({REQUEST_KEY: ConfigRecord(
        {CONTEXT_KEY: config.context, **other.to_dict()}), SIGNATURES_KEY: signatures}))
    _refused(reply, "differs from the survivor set this site signed")
    again = sites.send(sites.nodes[1], ACTION_CONSISTENCY, RecordDict({REQUEST_KEY: ConfigRecord(
        {CONTEXT_KEY: config.context, **other.to_dict()})}))
    _refused(again, "signs one survivor set only")


@pytest.mark.parametrize(("count", "create", "policy", "why"), [
    (20, {"degree": 4, "threshold": 3}, {}, "graph degree 4"),
    (7, {"threshold": 4}, {}, "threshold 4 of 7"),
    (2, {"allow_two_sites": True}, {}, "policy needs at least 3"),
])
def test_weakened_rounds_are_refused_before_training(count: int, create: dict, policy: dict, why: str) -> None:
    sites = Sites(count, policy=policy)
    config, content = _round(sites.nodes, **create)
    replies = _advertise(sites, sites.nodes, content)
    for reply in replies.values():
        _refused(reply, why)
    assert all(site.trained == 0 for site in sites.fake.values()), "nothing was trained, so nothing can leak"


def test_the_sites_own_policy_decides_the_bounds() -> None:
    sites = Sites(7, policy={"secagg-min-threshold": "0.5"})
    config, content = _round(sites.nodes, threshold=4)  # a strict majority of 7, below two thirds
    assert not [r for r in _advertise(sites, sites.nodes, content).values() if r.has_error()]
    sites = Sites(2, policy={"secagg-allow-two-sites": "true"})
    config, content = _round(sites.nodes, allow_two_sites=True)
    assert not [r for r in _advertise(sites, sites.nodes, content).values() if r.has_error()]


def test_a_site_without_a_roster_refuses_secure_aggregation() -> None:
    sites = Sites(3)
    sites.configs = {n: {"site-id": sites.fake[n].name} for n in sites.nodes}
    _, content = _round(sites.nodes)
    for reply in _advertise(sites, sites.nodes, content).values():
        _refused(reply, '[federation] roster = "roster.json"')
    assert all(site.trained == 0 for site in sites.fake.values())
