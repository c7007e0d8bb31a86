"""audit_mod: every reply of every message type is recorded before it leaves; values never are."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedfusion.client.audit import iter_records, payload_sha256
from fedfusion.client.audit_mod import audit_mod

DISTINCT = 0.123456789


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime


def _incoming(message_type: str = "train") -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 4})})
    return Message(content, dst_node_id=7, message_type=message_type)


def _context(node_config: dict) -> Context:
    return Context(run_id=99, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _reply_to(msg: Message) -> Message:
    weights = np.full((3, 2), DISTINCT, dtype=np.float32)
    content = RecordDict({"arrays": ArrayRecord({"head.weight": Array(weights)}),
                          "metrics": MetricRecord({"num-examples": 12, "epsilon": 0.7}),
                          "site": ConfigRecord({"site-id": "A", "share": b"\x00" * 48})})
    return Message(content, reply_to=msg)


def test_a_train_reply_is_recorded_with_shapes_norms_and_hash_not_values(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    msg = _incoming("train")
    reply = audit_mod(msg, _context({"audit-log": str(log), "site-id": "A"}), lambda m, c: _reply_to(m))
    assert reply.has_content()
    (record,) = list(iter_records(log))
    assert record["site_id"] == "A" and record["run_id"] == 99 and record["round"] == 4
    assert record["message_type"] == "train" and record["epsilon"] == pytest.approx(0.7)
    assert record["tensors"][0]["name"] == "arrays/head.weight" and record["tensors"][0]["shape"] == [3, 2]
    # ciphertexts: size and hash, never their bytes
    assert record["metrics"]["site/share"] == {"nbytes": 48, "sha256": hashlib.sha256(b"\x00" * 48).hexdigest()}
    assert record["node_id"] == 7
    assert str(DISTINCT)[:8] not in log.read_text()
    tensors = {"arrays/head.weight": reply.content.array_records["arrays"]["head.weight"].numpy()}
    assert record["sha256"] == payload_sha256(tensors, record["metrics"])


def test_every_message_type_passes_through_the_mod(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    audit_mod(_incoming("evaluate"), _context({"audit-log": str(log), "site-id": "A"}), lambda m, c: _reply_to(m))
    # Secure-aggregation stages carry no train config: the round comes from the message's group id.
    stage = Message(RecordDict(), dst_node_id=7, message_type="train.secagg_masked_input", group_id="5")
    audit_mod(stage, _context({"audit-log": str(log), "site-id": "A"}), lambda m, c: _reply_to(m))
    assert [(r["message_type"], r["round"]) for r in iter_records(log)] == [
        ("evaluate", 4), ("train.secagg_masked_input", 5)]


def test_without_an_audit_log_the_reply_is_untouched(tmp_path: Path) -> None:
    msg = _incoming()
    sent = _reply_to(msg)
    assert audit_mod(msg, _context({}), lambda m, c: sent) is sent
    assert list(tmp_path.iterdir()) == []


def test_a_log_that_cannot_be_written_stops_the_reply(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the log's folder should be")
    with pytest.raises(OSError):
        audit_mod(_incoming(), _context({"audit-log": str(blocked / "audit.jsonl"), "site-id": "A"}),
                  lambda m, c: _reply_to(m))


def test_the_coordinator_recomputes_the_audit_hash_from_the_reply_it_received(tmp_path: Path) -> None:
    """The reply crosses the wire as Flower's object tree; what the coordinator inflates hashes (with the
    shared reply_sha256) to exactly the audit line's sha256, ciphertext lists and error replies included."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from fedfusion.common.reply_digest import reply_sha256

    def with_ciphertexts(msg: Message) -> Message:
        reply = _reply_to(msg)
        reply.content["bundles"] = ConfigRecord({"to": [b"\x01" * 16, b"\x02" * 20]})
        return reply

    log = tmp_path / "audit.jsonl"
    handlers = [with_ciphertexts, lambda m: Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "refused: x"),
                                                    reply_to=m)]
    received = []
    for handler in handlers:
        sent = audit_mod(_incoming(), _context({"audit-log": str(log), "site-id": "A"}), lambda m, c, h=handler: h(m))
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(sent).items()}
        received.append(reply_sha256(inflate_object_from_contents(sent.object_id, contents)))
    records = list(iter_records(log))
    assert [r["sha256"] for r in records] == received and len(set(received)) == 2
    assert records[0]["metrics"]["bundles/to"]["items"] == 2 and records[1]["metrics"] == {"error": "refused: x"}
    # Changing one ciphertext byte changes the hash: the list is bound by content, not only by size.
    changed = _reply_to(_incoming())
    changed.content["bundles"] = ConfigRecord({"to": [b"\x01" * 16, b"\x03" * 20]})
    assert reply_sha256(changed) != received[0]
