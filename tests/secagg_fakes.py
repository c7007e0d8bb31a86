"""In-process stand-ins for secure-aggregation tests: a Grid that hands each message to a ClientApp
at once, and sites whose "training" adds a known change to the global model.

The Grid serialises every message, reply and site state through Flower's protobuf serde, as a
deployment would (uint64 node ids, bytes, uint32 arrays), and gives the ClientApp a fresh copy of
the site's ``context.state`` per message: state that survives here survives a new process per
message at a real SuperNode. Every reply the server receives is kept in ``received``.
"""

from __future__ import annotations

import string
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedfusion.client.secure_aggregation import refuse_unmasked_update, register_secure_aggregation
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.flower_adapter import roundtrip  # what arrives after Flower serialises a RecordDict
from fedfusion.common.packing import LAYOUT_KEY, PackLayout, is_packed, sent_layout
from fedfusion.common.records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    REFUSED_KEY,
    SITE_KEY,
    arrays_to_numpy,
    modality_count_key,
    numpy_to_arrays,
)
from fedfusion.common.roster import Roster
from fedfusion.common.secagg import AdvertisedKeys, SecAggConfig
from fedfusion.common.secagg.settings import CONTEXT_KEY, PACKING_KEY, ROUND_KEY
from fedfusion.common.secagg.testbed import partition_key_path, write_testbed

#: state_dict key -> parameter group, as ``FusionModel.parameter_groups()`` gives them (buffers absent).
PARAMETER_GROUPS = {"encoders.image.w": "image", "encoders.omics.w": "omics", "encoders.clinical.w": "clinical",
                    "fusion.w": "fusion", "heads.risk.w": "head"}
SHAPES = {"encoders.image.w": (4, 3), "encoders.omics.w": (5,), "encoders.clinical.w": (3, 2), "fusion.w": (6,),
          "heads.risk.w": (2, 2), "fusion.bn.running_mean": (6,)}
COUNTER = "fusion.bn.num_batches_tracked"
MODALITIES = ("image", "clinical", "omics")


def global_model(seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights and buffers plus one integer buffer (not averaged)."""
    rng = np.random.default_rng(seed)
    model = {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    model[COUNTER] = np.array(7, dtype=np.int64)
    return model


@dataclass
class FakeSite:
    """A site's known update (change of every float array) and example counts per modality."""

    name: str
    delta: dict[str, np.ndarray]
    counts: dict[str, float]
    refuse: bool = False
    trained: int = 0


def make_sites(names: Iterable[str], seed: int = 1, lacking: Mapping[str, set[str]] | None = None,
               scale: float = 0.05) -> list[FakeSite]:
    """Sites with random updates of size ~``scale``; a site lacking a modality reports 0 cases for it."""
    rng = np.random.default_rng(seed)
    sites = []
    for name in names:
        missing = (lacking or {}).get(name, set())
        n = int(rng.integers(20, 200))
        counts = {NUM_EXAMPLES: float(n), **{modality_count_key(m): 0.0 if m in missing else float(n - 3)
                                             for m in MODALITIES}}
        delta = {key: (rng.normal(size=shape) * scale).astype(np.float32) for key, shape in SHAPES.items()}
        sites.append(FakeSite(name, delta, counts))
    return sites


def make_train(sites: Mapping[int, FakeSite]) -> Any:
    """A ClientApp train function: the global model plus the site's delta, counts as metrics."""

    def train(msg: Message, context: Context) -> Message:
        site = sites[int(msg.metadata.dst_node_id)]
        site.trained += 1
        if site.refuse:
            return Message(RecordDict({METRICS_KEY: MetricRecord({"epsilon": 1.5}),
                                       SITE_KEY: ConfigRecord({"site-id": site.name, REFUSED_KEY: "budget spent"})}),
                           reply_to=msg)
        # as client/app.py: a packed model is read with the site's layout, the reply packed likewise (a fake
        # site has no model: it reads secure stage one's sent slots, which client/app.py checks against its own)
        config = msg.content.config_records.get(CONFIG_KEY)
        slots = msg.content[ROUND_KEY].get(PACKING_KEY) if ROUND_KEY in msg.content else None
        layout = (PackLayout.from_json(str(slots), sent_layout(config)) if slots is not None
                  else PackLayout.of(global_model(), PARAMETER_GROUPS))
        current = (layout.unpack(msg.content[ARRAYS_KEY], sent_layout(config)) if is_packed(config)
                   else arrays_to_numpy(msg.content[ARRAYS_KEY]))
        new = {k: (v + site.delta[k]).astype(v.dtype) if k in site.delta else v + 3 for k, v in current.items()}
        packed = is_packed(config)
        return Message(RecordDict({ARRAYS_KEY: layout.pack(new) if packed else numpy_to_arrays(new),
                                   METRICS_KEY: MetricRecord(site.counts),
                                   SITE_KEY: ConfigRecord({"site-id": site.name,
                                                           **({LAYOUT_KEY: layout.sha256} if packed else {})})}),
                       reply_to=msg)

    return train


def make_app(sites: Mapping[int, FakeSite], run_config: Mapping[str, Any]) -> ClientApp:
    """A ClientApp wired like ``client/app.py``: guarded plain train plus the four secagg stages."""
    app = ClientApp()

    def config_fn(context: Context) -> tuple[FederationConfig, dict[str, Any]]:
        flat = {**run_config, **dict(context.run_config)}
        return FederationConfig.from_run_config(flat), flat

    train = make_train(sites)
    app.train(mods=[refuse_unmasked_update(config_fn)])(train)
    register_secure_aggregation(app, train, config_fn)
    return app


#: Site names with a key and roster entry in the shared test bed: one letter each, then S26..S63.
TESTBED_SITES = tuple(string.ascii_uppercase) + tuple(f"S{i}" for i in range(26, 64))


@cache
def testbed() -> tuple[Path, Roster]:
    """One roster and one signing key per letter, made once per test session (64 ECDSA keys)."""
    folder = Path(tempfile.mkdtemp(prefix="fedfusion-secagg-testbed-"))
    return folder, write_testbed(folder, TESTBED_SITES)


def identity_config(name: str, **policy: Any) -> dict[str, Any]:
    """A site's node config as ``fedfusion site start`` writes it: roster, signing key, site id, policy."""
    folder, _ = testbed()
    key = partition_key_path(folder, TESTBED_SITES.index(name))
    return {"roster": str(folder / "roster.json"), "signing-key": str(key), "site-id": name, **policy}


def identity_configs(sites: Mapping[int, FakeSite], **policy: Any) -> dict[int, dict[str, Any]]:
    """``LoopbackGrid.node_configs`` giving each fake site its own identity."""
    return {node: identity_config(site.name, **policy) for node, site in sites.items()}


def broadcast_record(config: SecAggConfig, keys: Mapping[int, AdvertisedKeys]) -> ConfigRecord:
    """The stage-2 message an honest coordinator sends: every advertised entry as it arrived."""
    nodes = sorted(keys)
    return ConfigRecord({CONTEXT_KEY: config.context, "nodes": nodes,
                         "encryption-keys": [keys[n].encryption_key for n in nodes],
                         "mask-keys": [keys[n].mask_key for n in nodes],
                         "site-ids": [keys[n].site_id for n in nodes],
                         "signatures": [keys[n].signature for n in nodes]})


@dataclass
class LoopbackGrid:
    """A Grid whose nodes answer through ``app`` at push time; ``silent`` (node, action) pairs never answer."""

    app: ClientApp
    node_ids: list[int]
    run_config: Mapping[str, Any] = field(default_factory=dict)
    silent: set[tuple[int, str]] = field(default_factory=set)
    received: list[Message] = field(default_factory=list)
    states: dict[int, RecordDict] = field(default_factory=dict)
    node_config: dict[str, Any] = field(default_factory=dict)
    node_configs: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Per-node node config (e.g. ``partition-id``), on top of ``node_config``."""
    _replies: dict[str, Message] = field(default_factory=dict)
    _count: int = 0

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            self._count += 1
            message_id = f"m{self._count}"
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            node = int(message.metadata.dst_node_id)
            action = message.metadata.message_type.partition(".")[2] or "default"
            if (node, action) in self.silent:
                continue
            delivered = Message(roundtrip(message.content), dst_node_id=node,
                                message_type=message.metadata.message_type, group_id=message.metadata.group_id)
            delivered.metadata.__dict__["_message_id"] = message_id
            context = Context(run_id=1, node_id=node,
                              node_config={**self.node_config, **self.node_configs.get(node, {})},
                              state=roundtrip(self.states.get(node, RecordDict())), run_config={})
            reply = self.app(delivered, context)
            self.states[node] = roundtrip(context.state)  # the SuperNode keeps it; the process ends
            if reply.has_content():
                reply = Message(roundtrip(reply.content), reply_to=delivered)
            self._replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        found = [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
        self.received += found
        return found
