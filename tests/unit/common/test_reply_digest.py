"""Each reply's tensors are hashed once per side, and every digest stays byte for byte what it was (#17).

The reference below is the digest as it was computed before the tensors' hash was shared (one pass over
tensors and metrics, straight from common/reply_digest.py's docstring): audit logs, ``replies.jsonl``
lines and signatures written before must keep verifying.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedfusion.common import reply_digest
from fedfusion.common.reply_digest import reply_sha256, reply_tensors_sha256
from fedfusion.common.reply_signature import PURPOSE, SIGNATURE_RECORD, signed_statement, unsigned_reply_sha256
from fedfusion.common.roster import Roster, sign

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime


# --- the digest as it was computed before #17 (one pass; no shared state) -------------------------------


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, bytes):
        return {"sha256": hashlib.sha256(value).hexdigest(), "nbytes": len(value)}
    return value


def _reference_payload(reply: Message) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if not reply.has_content():
        return {}, {"error": reply.error.reason if reply.has_error() else ""}
    tensors = {f"{r}/{k}": a.numpy() for r, rec in reply.content.array_records.items() for k, a in rec.items()}
    metrics: dict[str, Any] = {}
    for r, rec in reply.content.metric_records.items():
        metrics.update({f"{r}/{k}": v for k, v in rec.items()})
    for r, rec in reply.content.config_records.items():
        for k, v in rec.items():
            if isinstance(v, list) and v and isinstance(v[0], bytes):
                items = hashlib.sha256(b"".join(_framed(bytes(b)) for b in v)).hexdigest()
                v = {"bytes": sum(len(b) for b in v), "items": len(v), "sha256": items}
            metrics[f"{r}/{k}"] = v
    return tensors, metrics


def _reference_sha256(reply: Message, *, signed: bool = True) -> str:
    tensors, metrics = _reference_payload(reply)
    if not signed:
        metrics = {k: v for k, v in metrics.items() if not k.startswith(f"{SIGNATURE_RECORD}/")}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(_framed(_canonical({"dtype": array.dtype.str, "name": name, "shape": list(array.shape)})))
        digest.update(_framed(array.tobytes(order="C")))
    digest.update(_framed(_canonical(_plain(metrics))))
    return digest.hexdigest()


# --- replies of every kind a site sends -----------------------------------------------------------------


def _request(message_id: str = "req-1", message_type: str = "train") -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"server-round": 3})}), dst_node_id=4,
                      message_type=message_type)
    request.metadata.__dict__["_message_id"] = message_id  # what the Grid sets when it pushes
    return request


def _packed(request: Message) -> Message:
    """The model packed into one array per aggregation group, mixed dtypes, a Fortran-ordered array."""
    rng = np.random.default_rng(1)
    arrays = {"group-0": rng.standard_normal(5000).astype(np.float32),
              "group-1": rng.standard_normal(700).astype(np.float32),
              "group-2": np.asfortranarray(rng.standard_normal((6, 5))),  # float64, stored column-major
              "counts": np.arange(4, dtype=np.int64)}
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": 40, "loss": 0.25, "epsilon": 1.5}),
                               "site": ConfigRecord({"site-id": "A"})}), reply_to=request)


def _per_tensor(request: Message) -> Message:
    """One array per model tensor, in two array records, with non-finite metrics."""
    rng = np.random.default_rng(2)
    model = {f"layer{i}.weight": rng.standard_normal((3, i + 1)).astype(np.float32) for i in range(30)}
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in model.items()}),
                               "head": ArrayRecord({"bias": Array(np.zeros(2, dtype=np.float16)),
                                                    "scalar": Array(np.array(3.5))}),
                               "metrics": MetricRecord({"num-examples": 12, "loss": float("nan"),
                                                        "grad": float("inf")}),
                               "site": ConfigRecord({"site-id": "A"})}), reply_to=request)


def _secure_aggregation(request: Message) -> Message:
    """A secure-aggregation stage: a masked integer vector and lists of ciphertexts (bytes)."""
    masked = np.random.default_rng(3).integers(0, 2**22, size=1000, dtype=np.int64)
    return Message(RecordDict({"arrays": ArrayRecord({"masked": Array(masked)}),
                               "secagg": ConfigRecord({"shares": [b"\x01" * 16, b"\x02" * 40],
                                                       "dst": [5, 6], "public-key": b"\x03" * 65})}),
                   reply_to=request)


def _error(request: Message) -> Message:
    return Message(Error(code=1, reason="refused: not approved"), reply_to=request)


REPLIES = {"packed": _packed, "per-tensor": _per_tensor, "secure-aggregation": _secure_aggregation,
           "error": _error}


def _sign(reply: Message, key: ec.EllipticCurvePrivateKey, site: str = "A") -> Message:
    """What client/reply_signing.py does to a reply with content."""
    statement = signed_statement(reply.metadata.run_id, reply.metadata.reply_to_message_id, site,
                                 unsigned_reply_sha256(reply))
    reply.content.config_records[SIGNATURE_RECORD] = ConfigRecord({"site-id": site,
                                                                   "signature": sign(key, PURPOSE, statement)})
    return reply


def _keypair(folder: Path) -> tuple[Path, ec.EllipticCurvePrivateKey, Roster]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = folder / "site.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return path, key, Roster.from_lines({"A": line})


@pytest.fixture()
def walks(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The tensor sets hashed (names), one entry per walk over a reply's tensors."""
    seen: list[list[str]] = []
    real = reply_digest.tensors_sha256

    def counting(tensors: Mapping[str, np.ndarray]) -> Any:
        seen.append(sorted(tensors))
        return real(tensors)

    monkeypatch.setattr(reply_digest, "tensors_sha256", counting)
    return seen


# --- the tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(REPLIES))
def test_digests_are_byte_for_byte_the_old_ones(kind: str) -> None:
    reply = REPLIES[kind](_request())
    assert reply_sha256(reply) == _reference_sha256(reply)
    assert unsigned_reply_sha256(reply) == _reference_sha256(reply, signed=False)
    tensors, metrics = reply_digest.reply_payload(reply)
    assert reply_digest.payload_sha256(tensors, metrics) == _reference_sha256(reply)
    if reply.has_content():  # signed: the reply's digest covers the signature, the signed one does not
        unsigned = unsigned_reply_sha256(reply)
        _sign(reply, ec.generate_private_key(ec.SECP256R1()))
        assert reply_sha256(reply) == _reference_sha256(reply) != unsigned
        assert unsigned_reply_sha256(reply) == unsigned == _reference_sha256(reply, signed=False)


def test_a_changed_reply_is_never_given_a_stale_digest() -> None:
    reply = _per_tensor(_request())
    before = reply_sha256(reply)
    seen = {before}

    def changed(edit: Any) -> None:
        edit()
        digest = reply_sha256(reply)
        assert digest == _reference_sha256(reply) and digest not in seen
        assert unsigned_reply_sha256(reply) == _reference_sha256(reply, signed=False)
        seen.add(digest)

    arrays = reply.content.array_records["arrays"]
    changed(lambda: reply.content.config_records.__setitem__(  # what the signing mod adds after hashing
        SIGNATURE_RECORD, ConfigRecord({"site-id": "A", "signature": b"\x07" * 64})))
    changed(lambda: arrays.__setitem__("layer0.weight", Array(np.full((3, 1), 9.0, dtype=np.float32))))
    changed(lambda: setattr(arrays["layer1.weight"], "data", Array(np.ones((3, 2), dtype=np.float32)).data))
    changed(lambda: arrays.__delitem__("layer2.weight"))
    changed(lambda: reply.content.__setitem__("extra", ArrayRecord({"w": Array(np.ones(1, dtype=np.float32))})))
    changed(lambda: reply.content["metrics"].__setitem__("num-examples", 13))
    changed(lambda: setattr(reply, "content", _packed(_request()).content))


def test_an_array_held_in_a_mutable_buffer_is_rehashed_every_time() -> None:
    reply = _secure_aggregation(_request())
    array = reply.content.array_records["arrays"]["masked"]
    array.data = bytearray(array.data)  # could change in place: identity says nothing about content
    first = reply_sha256(reply)
    array.data[-1] ^= 0xFF
    assert reply_sha256(reply) == _reference_sha256(reply) != first


def test_a_cached_state_goes_with_its_reply() -> None:
    gc.collect()
    held = len(reply_digest._TENSOR_DIGESTS)
    reply = _packed(_request())
    reply_sha256(reply)
    assert len(reply_digest._TENSOR_DIGESTS) == held + 1
    del reply
    gc.collect()
    assert len(reply_digest._TENSOR_DIGESTS) == held  # the entry does not keep its reply alive


def test_finishing_a_state_leaves_it_reusable() -> None:
    reply = _packed(_request())
    state = reply_tensors_sha256(reply)
    assert reply_digest.finish_sha256(state, {"a": 1}) == reply_digest.finish_sha256(state, {"a": 1})
    state.update(b"tampered")  # a caller's copy: the cached state is not affected
    assert reply_sha256(reply) == _reference_sha256(reply)


def test_the_site_hashes_each_reply_once_for_signature_and_audit(tmp_path: Path, walks: list[list[str]]) -> None:
    from fedfusion.client.audit import iter_records
    from fedfusion.client.audit_mod import audit_mod
    from fedfusion.client.reply_signing import SIGNING_KEY_NODE_KEY, reply_signing_mod

    key_path, _, roster = _keypair(tmp_path)
    log = tmp_path / "audit.jsonl"
    context = Context(run_id=1, node_id=4, node_config={"site-id": "A", SIGNING_KEY_NODE_KEY: str(key_path),
                                                        "audit-log": str(log)}, state=RecordDict(), run_config={})
    sent = {}
    for kind, build in sorted(REPLIES.items()):
        request = _request(f"req-{kind}")
        sent[kind] = audit_mod(request, context,
                               lambda m, c, b=build: reply_signing_mod(m, c, lambda m2, c2, b=b: b(m2)))
    records = list(iter_records(log))
    assert [r["sha256"] for r in records] == [_reference_sha256(sent[kind]) for kind in sorted(REPLIES)]
    for kind, reply in sent.items():
        if reply.has_content():
            signature = reply.content.config_records[SIGNATURE_RECORD]["signature"]
            statement = signed_statement(1, f"req-{kind}", "A", _reference_sha256(reply, signed=False))
            assert roster.verify("A", PURPOSE, statement, signature)
    with_tensors = [w for w in walks if w]
    assert len(with_tensors) == 3  # packed, per-tensor, secure aggregation: one walk each, not two
    assert sorted(len(w) for w in with_tensors) == [1, 4, 32]


def test_the_coordinator_hashes_each_reply_once_for_log_and_attribution(tmp_path: Path,
                                                                        walks: list[list[str]]) -> None:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from fedfusion.server.messaging import RecordingGrid, ReplyLog, read_replies, send_and_collect
    from fedfusion.server.reply_attribution import AttributingGrid

    _, key, roster = _keypair(tmp_path)
    requests = [_request(f"req-{kind}") for kind in sorted(REPLIES)]
    replies = []
    for kind, request in zip(sorted(REPLIES), requests, strict=True):
        sent = REPLIES[kind](request)
        if sent.has_content():
            _sign(sent, key)
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(sent).items()}
        replies.append(inflate_object_from_contents(sent.object_id, contents))  # as it crossed the wire
    walks.clear()  # signing was the site's walk; from here on the coordinator's

    class Inner:  # the Grid below RecordingGrid: hands out the replies as they arrived
        def push_messages(self, messages: Iterable[Message]) -> list[str]:
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids: Iterable[str]) -> list[Message]:
            wanted = set(ids)
            return [r for r in replies if r.metadata.reply_to_message_id in wanted]

    log = tmp_path / "replies.jsonl"
    grid = AttributingGrid(RecordingGrid(Inner(), ReplyLog(log)), roster)  # type: ignore[arg-type]
    received = send_and_collect(grid, requests, timeout=1.0, poll_interval_s=0.01)
    assert received == replies and grid.refused == []  # every signature verified
    assert [line["sha256"] for line in read_replies(log)] == [_reference_sha256(r) for r in replies]
    assert len([w for w in walks if w]) == 3  # one walk per reply with tensors, shared by log and attribution
