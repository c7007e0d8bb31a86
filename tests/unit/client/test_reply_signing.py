"""The site's signing mod: replies carry a signature over exactly the reply and its request."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedfusion.client.reply_signing import SIGNING_KEY_NODE_KEY, reply_signing_mod
from fedfusion.common.reply_signature import PURPOSE, SIGNATURE_RECORD, signed_statement, unsigned_reply_sha256
from fedfusion.common.roster import Roster

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime


def _answer(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 7})}), reply_to=msg)


def test_replies_are_signed_for_their_request_and_verify_under_the_roster(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "site.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    roster = Roster.from_lines({"A": line})
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=3, message_type="train")
    msg.metadata.__dict__["_message_id"] = "req-9"
    context = Context(run_id=11, node_id=3, node_config={"site-id": "A", SIGNING_KEY_NODE_KEY: str(path)},
                      state=RecordDict(), run_config={})
    reply = reply_signing_mod(msg, context, _answer)
    record = reply.content.config_records[SIGNATURE_RECORD]
    assert record["site-id"] == "A"
    statement = signed_statement(11, "req-9", "A", unsigned_reply_sha256(reply))
    assert roster.verify("A", PURPOSE, statement, record["signature"])
    assert not roster.verify("A", PURPOSE, signed_statement(12, "req-9", "A", unsigned_reply_sha256(reply)),
                             record["signature"])  # another run


def test_without_a_key_replies_pass_unsigned() -> None:
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=3, message_type="train")
    context = Context(run_id=11, node_id=3, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    assert SIGNATURE_RECORD not in reply_signing_mod(msg, context, _answer).content.config_records


def test_the_node_config_key_is_the_one_secure_aggregation_reads() -> None:
    from fedfusion.client.secagg_identity import SIGNING_KEY_NODE_KEY as SECAGG_KEY

    assert SIGNING_KEY_NODE_KEY == SECAGG_KEY
