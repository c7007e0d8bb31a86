"""The site's secure-aggregation handlers with fake messages and contexts: a plain train request is
refused in a secure run, state survives a new process per message and is deleted when no longer
needed, and messages out of order, from another round or with a foreign layout are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedfusion.client.secure_aggregation import (
    STATE_CLIENT,
    STATE_ROUND,
    STATE_UPDATE,
    TEST_DROP_AT_UNMASK_KEY,
)
from fedfusion.common.packing import LAYOUT_KEY as PACKED_LAYOUT_KEY
from fedfusion.common.packing import PackLayout
from fedfusion.common.records import ARRAYS_KEY, CONFIG_KEY, numpy_to_arrays
from fedfusion.common.secagg import (
    AdvertisedKeys,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    Stage,
    UnmaskReply,
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
    CONTEXT_KEY,
    KEYS_KEY,
    LAYOUT_KEY,
    MASKED_KEY,
    PACKING_KEY,
    REQUEST_KEY,
    ROUND_KEY,
    SHARES_KEY,
    SIGNATURE_KEY,
    SIGNATURES_KEY,
    WEIGHT_KEYS_KEY,
)
from fedfusion.server.secure_aggregation import masked_layout
from tests.secagg_fakes import (
    PARAMETER_GROUPS,
    broadcast_record,
    global_model,
    identity_config,
    make_app,
    make_sites,
    roundtrip,
)

NODES = [7, 8, 9]
RUN = {"secure-aggregation": True, "secagg-weight-bound": 1000.0}


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime


class _Site:
    """One site's ClientApp and the state its SuperNode keeps between messages (one 'process' each)."""

    def __init__(self, node: int, run_config: dict[str, Any] | None = None, node_config: dict | None = None):
        self.node = node
        self.sites = dict(zip(NODES, make_sites("ABC"), strict=True))
        self.app = make_app(self.sites, {**RUN, **(run_config or {})})
        self.state = RecordDict()
        self.node_config = {**identity_config(self.sites[node].name), **(node_config or {})}

    def send(self, action: str, content: RecordDict) -> Message:
        message_type = f"train.{action}" if action else "train"
        msg = Message(roundtrip(content), dst_node_id=self.node, message_type=message_type, group_id="1")
        msg.metadata.__dict__["_message_id"] = "m"
        context = Context(run_id=1, node_id=self.node, node_config=self.node_config, state=roundtrip(self.state),
                          run_config={})
        reply = self.app(msg, context)
        self.state = roundtrip(context.state)
        return reply


def _layout() -> Any:
    return masked_layout(global_model(), PARAMETER_GROUPS)[0]


def _round_setup(nodes: list[int] = NODES) -> tuple[SecAggConfig, RecordDict, SecAggServer]:
    current = global_model()
    layout, weight_keys = masked_layout(current, PARAMETER_GROUPS)
    config = SecAggConfig.create(nodes, layout, clip=1.0, weight_bound=1000.0)
    record = ConfigRecord({**config.to_record(), LAYOUT_KEY: layout.to_json(),
                           WEIGHT_KEYS_KEY: json.dumps(weight_keys)})
    content = RecordDict({ARRAYS_KEY: numpy_to_arrays(current), CONFIG_KEY: ConfigRecord({"server-round": 1}),
                          ROUND_KEY: record})
    return config, content, SecAggServer(config, layout)


def _run_stages(sites: dict[int, _Site], config: SecAggConfig, content: RecordDict, server: SecAggServer) -> dict:
    """Drive all four stages against every site; return the replies of each stage."""
    ctx = {CONTEXT_KEY: config.context}
    keys = {n: s.send(ACTION_ADVERTISE_KEYS, content) for n, s in sites.items()}
    broadcast = server.collect_keys({n: AdvertisedKeys.from_dict(r.content[KEYS_KEY]) for n, r in keys.items()})
    everyone = RecordDict({KEYS_KEY: broadcast_record(config, broadcast)})
    shared = {n: s.send(ACTION_SHARE_KEYS, everyone) for n, s in sites.items()}
    routed = server.route_shares({n: bundles_from_dict(r.content[BUNDLES_KEY]) for n, r in shared.items()})
    masked = {n: s.send(ACTION_MASKED_INPUT, RecordDict({BUNDLES_KEY: ConfigRecord(
        {**ctx, **bundles_to_dict(routed[n])})})) for n, s in sites.items()}
    request = server.collect_masked_inputs({n: r.content[MASKED_KEY]["masked-input"].numpy()
                                            for n, r in masked.items()})
    request_record = ConfigRecord({**ctx, **request.to_dict()})
    signed = {n: s.send(ACTION_CONSISTENCY, RecordDict({REQUEST_KEY: request_record})) for n, s in sites.items()}
    signatures = ConfigRecord({"signers": sorted(signed),
                               "signatures": [signed[n].content[SIGNATURE_KEY]["signature"] for n in sorted(signed)]})
    unmask = {n: s.send(ACTION_UNMASK, RecordDict({REQUEST_KEY: request_record, SIGNATURES_KEY: signatures}))
              for n, s in sites.items()}
    ok = {n: UnmaskReply.from_dict(r.content[SHARES_KEY]) for n, r in unmask.items() if not r.has_error()}
    return {"keys": keys, "shared": shared, "masked": masked, "unmask": unmask, "result": server.unmask(ok)}


def test_plain_train_is_refused_in_a_secure_run() -> None:
    site = _Site(NODES[0])
    reply = site.send("", RecordDict({ARRAYS_KEY: numpy_to_arrays(global_model()),
                                      CONFIG_KEY: ConfigRecord({"server-round": 1})}))
    assert reply.has_error() and "never sends its update unmasked" in reply.error.reason
    assert site.sites[NODES[0]].trained == 0


def test_plain_train_runs_when_secure_aggregation_is_off_unless_the_site_requires_it() -> None:
    content = RecordDict({ARRAYS_KEY: numpy_to_arrays(global_model()), CONFIG_KEY: ConfigRecord({"server-round": 1})})
    reply = _Site(NODES[0], {"secure-aggregation": False}).send("", content)
    assert not reply.has_error() and ARRAYS_KEY in reply.content
    strict = _Site(NODES[0], {"secure-aggregation": False}, node_config={"require-secure-aggregation": "true"})
    reply = strict.send("", content)
    assert reply.has_error() and "require-secure-aggregation" in reply.error.reason


def test_state_survives_between_messages_and_is_deleted_when_done() -> None:
    config, content, server = _round_setup()
    sites = {n: _Site(n) for n in NODES}
    stages = _run_stages(sites, config, content, server)
    assert stages["result"].survivors == tuple(NODES)
    for site in sites.values():  # the round is over at every site: nothing kept
        assert STATE_CLIENT not in site.state and STATE_UPDATE not in site.state and STATE_ROUND not in site.state


def test_update_is_kept_after_training_and_deleted_once_masked() -> None:
    config, content, _ = _round_setup()
    site = _Site(NODES[0])
    reply = site.send(ACTION_ADVERTISE_KEYS, content)
    assert set(reply.content.keys()) == {KEYS_KEY}  # public keys only: no update, no counts
    assert STATE_UPDATE in site.state and STATE_CLIENT in site.state
    state = site.state[STATE_CLIENT]
    assert Stage(int(state["stage"])) is Stage.SHARE_KEYS and "mask-private-key" in state
    # kept as one quantised vector q(w * delta) (not masked yet): decoding it gives the site's delta back
    kept = _kept(site)
    assert kept.dtype == np.uint32
    sums, weights = config.encoder(SecAggClient(NODES[0], config, _layout()).layout).decode_sum(kept, 1)
    fake = site.sites[NODES[0]]
    np.testing.assert_allclose(sums["fusion.w"] / weights["shared"], fake.delta["fusion.w"], atol=1e-5)
    assert weights["shared"] == pytest.approx(fake.counts["num-examples"], abs=1e-3)


def _kept(site: _Site) -> np.ndarray:
    """The quantised update a site keeps between stage 1 and stage 3 (a private file the state names)."""
    return np.load(Path(str(site.state[STATE_UPDATE]["file"])))


def test_the_kept_update_is_a_private_file_deleted_once_masked_or_failed_and_swept_next_round(tmp_path: Path) -> None:
    """The update does not ride in context.state (serialised at every message) but in a 0600 file in a 0700
    folder beside the audit log; masking deletes it, a failed stage deletes it, and a file a crashed round
    left behind is swept when the next round starts; a file that changed length is refused, not masked."""
    config, content, server = _round_setup()
    sites = {n: _Site(n, node_config={"audit-log": str(tmp_path / f"site{n}" / "audit.jsonl")}) for n in NODES}
    site = sites[NODES[0]]
    site.send(ACTION_ADVERTISE_KEYS, content)
    path = Path(str(site.state[STATE_UPDATE]["file"]))
    assert path.parent == tmp_path / "site7" / "secagg-pending" and path.is_file()
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    stale = path.with_name(f"run1-node{NODES[0]}-{'ab' * 16}.npy")
    stale.write_bytes(b"left by a crashed round")
    site.send(ACTION_ADVERTISE_KEYS, content)  # a new round at this site: the old files go
    assert not stale.exists() and path.is_file()  # (the same round's context: the same file name, rewritten)
    stages = _run_stages(sites, config, content, server)
    assert stages["result"].survivors == tuple(NODES)
    assert not list((tmp_path / "site7" / "secagg-pending").iterdir())  # masked: deleted
    # a failed stage (a message of another round) forgets the round, file included
    site.send(ACTION_ADVERTISE_KEYS, content)
    kept = Path(str(site.state[STATE_UPDATE]["file"]))
    reply = site.send(ACTION_SHARE_KEYS, RecordDict({KEYS_KEY: ConfigRecord(
        {CONTEXT_KEY: b"another round id", "nodes": [], "encryption-keys": [], "mask-keys": []})}))
    assert reply.has_error() and not kept.exists() and STATE_UPDATE not in site.state


def _share_keys(sites: dict[int, _Site], config: SecAggConfig, content: RecordDict,
                server: SecAggServer) -> dict[int, dict[int, bytes]]:
    """Run stages 1 and 2 at every site; return the share bundles routed to each (stage 3's input)."""
    keys = {n: AdvertisedKeys.from_dict(s.send(ACTION_ADVERTISE_KEYS, content).content[KEYS_KEY])
            for n, s in sites.items()}
    broadcast = server.collect_keys(keys)
    everyone = RecordDict({KEYS_KEY: broadcast_record(config, broadcast)})
    shared = {n: bundles_from_dict(s.send(ACTION_SHARE_KEYS, everyone).content[BUNDLES_KEY])
              for n, s in sites.items()}
    return server.route_shares(shared)


def test_a_kept_update_that_changed_on_disk_is_refused_not_masked(tmp_path: Path) -> None:
    config, content, server = _round_setup()
    sites = {n: _Site(n, node_config={"audit-log": str(tmp_path / f"site{n}" / "audit.jsonl")}) for n in NODES}
    routed = _share_keys(sites, config, content, server)
    site = sites[NODES[0]]
    np.save(Path(str(site.state[STATE_UPDATE]["file"])), np.zeros(3, dtype=np.uint32))
    reply = site.send(ACTION_MASKED_INPUT, RecordDict({BUNDLES_KEY: ConfigRecord(
        {CONTEXT_KEY: config.context, **bundles_to_dict(routed[NODES[0]])})}))
    assert reply.has_error() and "does not hold the update this site kept" in reply.error.reason


def _packed_content(content: RecordDict, **round_values: Any) -> RecordDict:
    """``content`` (stage one) with the global model packed as the coordinator's strategy packs it."""
    packing = PackLayout.of(global_model(), PARAMETER_GROUPS)
    round_record = ConfigRecord({**dict(content[ROUND_KEY]), PACKING_KEY: packing.to_json(), **round_values})
    return RecordDict({ARRAYS_KEY: packing.pack(global_model()),
                       CONFIG_KEY: ConfigRecord({**dict(content[CONFIG_KEY]), PACKED_LAYOUT_KEY: packing.sha256}),
                       ROUND_KEY: round_record})


def test_packed_stage_one_keeps_the_same_update_as_per_tensor() -> None:
    """Stage one sends the packed model and its slots; the site keeps exactly the vector a per-tensor
    stage one gives (same delta, same weights), so masking does not depend on the wire format."""
    config, content, _ = _round_setup()
    per_tensor, packed = _Site(NODES[0]), _Site(NODES[0])
    per_tensor.send(ACTION_ADVERTISE_KEYS, content)
    reply = packed.send(ACTION_ADVERTISE_KEYS, _packed_content(content))
    assert set(reply.content.keys()) == {KEYS_KEY}
    np.testing.assert_array_equal(_kept(packed), _kept(per_tensor))


@pytest.mark.parametrize("slots", ["missing", "tampered", "garbage"])
def test_packing_slots_that_do_not_match_the_sent_layout_are_refused_before_training(slots: str) -> None:
    """A coordinator that describes the packed bytes differently from the layout hash it names (to have
    one tensor's numbers read as another's) is refused before the site trains or keeps anything."""
    config, content, _ = _round_setup()
    packed = _packed_content(content)
    rows = json.loads(str(packed[ROUND_KEY][PACKING_KEY]))
    rows[0][1], rows[1][1] = rows[1][1], rows[0][1]  # two tensors' names swapped
    values = {"missing": {}, "tampered": {PACKING_KEY: json.dumps(rows)}, "garbage": {PACKING_KEY: "[[1]]"}}[slots]
    record = {k: v for k, v in dict(packed[ROUND_KEY]).items() if k != PACKING_KEY}
    packed = RecordDict({ARRAYS_KEY: packed[ARRAYS_KEY], CONFIG_KEY: packed[CONFIG_KEY],
                         ROUND_KEY: ConfigRecord({**record, **values})})
    site = _Site(NODES[0])
    reply = site.send(ACTION_ADVERTISE_KEYS, packed)
    assert reply.has_error() and ("packing" in reply.error.reason), reply.error.reason
    assert site.sites[NODES[0]].trained == 0 and STATE_UPDATE not in site.state


def test_secrets_are_discarded_after_masking() -> None:
    config, content, server = _round_setup()
    sites = {n: _Site(n) for n in NODES}
    # run up to stage 3 by hand, then inspect one site's state
    ctx = {CONTEXT_KEY: config.context}
    routed = _share_keys(sites, config, content, server)
    site = sites[NODES[1]]
    reply = site.send(ACTION_MASKED_INPUT, RecordDict({BUNDLES_KEY: ConfigRecord(
        {**ctx, **bundles_to_dict(routed[NODES[1]])})}))
    assert reply.content[MASKED_KEY]["masked-input"].numpy().dtype == np.uint32
    state = site.state[STATE_CLIENT]
    assert STATE_UPDATE not in site.state
    assert not {"mask-private-key", "encryption-private-key", "self-mask-seed"} & set(state.keys())
    assert len(state["held"]) == 3  # its own shares and its two neighbours'


def test_stage_out_of_order_is_refused_and_forgets_the_round() -> None:
    config, content, _ = _round_setup()
    site = _Site(NODES[0])
    site.send(ACTION_ADVERTISE_KEYS, content)
    reply = site.send(ACTION_UNMASK, RecordDict({REQUEST_KEY: ConfigRecord(
        {CONTEXT_KEY: config.context, "survivors": NODES, "dropped": []})}))
    assert reply.has_error() and "stage UNMASK while in stage SHARE_KEYS" in reply.error.reason
    assert STATE_CLIENT not in site.state and STATE_UPDATE not in site.state


def test_message_of_another_round_is_refused() -> None:
    _, content, _ = _round_setup()
    site = _Site(NODES[0])
    site.send(ACTION_ADVERTISE_KEYS, content)
    reply = site.send(ACTION_SHARE_KEYS, RecordDict({KEYS_KEY: ConfigRecord(
        {CONTEXT_KEY: b"another round id", "nodes": [], "encryption-keys": [], "mask-keys": []})}))
    assert reply.has_error() and "another secure-aggregation round" in reply.error.reason


def test_stage_without_state_is_refused() -> None:
    reply = _Site(NODES[0]).send(ACTION_SHARE_KEYS, RecordDict({KEYS_KEY: ConfigRecord({CONTEXT_KEY: b"x" * 16})}))
    assert reply.has_error() and "no secure-aggregation state" in reply.error.reason


def test_a_layout_other_than_the_model_is_refused_before_training() -> None:
    _, content, _ = _round_setup()
    record = content[ROUND_KEY]
    layout = record[LAYOUT_KEY].replace('"fusion.w","shared",[6]', '"fusion.w","shared",[7]')
    content[ROUND_KEY] = ConfigRecord({**dict(record), LAYOUT_KEY: layout})
    site = _Site(NODES[0])
    reply = site.send(ACTION_ADVERTISE_KEYS, content)
    assert reply.has_error() and "layout does not match the global model" in reply.error.reason
    assert site.sites[NODES[0]].trained == 0


def test_weighting_by_anything_but_example_counts_is_refused() -> None:
    _, content, _ = _round_setup()
    record = content[ROUND_KEY]
    content[ROUND_KEY] = ConfigRecord({**dict(record), WEIGHT_KEYS_KEY: record[WEIGHT_KEYS_KEY].replace(
        '"shared": "num-examples"', '"shared": "loss"')})
    reply = _Site(NODES[0]).send(ACTION_ADVERTISE_KEYS, content)
    assert reply.has_error() and "example counts" in reply.error.reason


def test_example_count_above_the_weight_bound_is_refused() -> None:
    _, content, _ = _round_setup()
    site = _Site(NODES[0])
    site.sites[NODES[0]].counts["num-examples"] = 5000.0
    reply = site.send(ACTION_ADVERTISE_KEYS, content)
    assert reply.has_error() and "secagg-weight-bound" in reply.error.reason
    assert STATE_UPDATE not in site.state


def test_refusal_to_train_is_passed_on_without_keys() -> None:
    _, content, _ = _round_setup()
    site = _Site(NODES[0])
    site.sites[NODES[0]].refuse = True
    reply = site.send(ACTION_ADVERTISE_KEYS, content)
    assert reply.content["site"]["refused"] == "budget spent" and KEYS_KEY not in reply.content
    assert STATE_CLIENT not in site.state


def test_test_hook_drops_a_site_before_unmasking() -> None:
    config, content, server = _round_setup()
    sites = {n: _Site(n, {TEST_DROP_AT_UNMASK_KEY: "B@1"}) for n in NODES}  # NODES[1] is site B
    stages = _run_stages(sites, config, content, server)
    assert stages["unmask"][NODES[1]].has_error()
    assert "simulated dropout" in stages["unmask"][NODES[1]].error.reason
    assert stages["result"].survivors == tuple(NODES)  # its input is in the sum all the same
    assert STATE_CLIENT not in sites[NODES[1]].state
