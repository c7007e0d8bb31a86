"""A ClientApp mod that signs every reply with the site's node key, so the coordinator can attribute it.

The statement and record layout are :mod:`fedfusion.common.reply_signature`'s. The key is the one the
site already authenticates its SuperNode with (``[auth] private-key``; node config ``signing-key``, the
key secure aggregation signs with too), the site id is the node config's ``site-id``. Without a
``signing-key`` in the node config (simulation, development) replies pass through unsigned; a
coordinator that holds a roster then refuses them, so a deployment with a roster needs both.

It runs inside the audit mod: the audit log records the reply as it leaves, signature included, which
is also what the coordinator's ``replies.jsonl`` hashes. Error replies carry no content to sign.
Hashing the reply here keeps its tensors' hash with the reply object
(:func:`fedfusion.common.reply_digest.reply_tensors_sha256`); the audit mod reuses it and hashes only
the metrics again, signature record included.
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message

from fedfusion.common.flower_adapter import ClientAppCallable
from fedfusion.common.reply_signature import PURPOSE, SIGNATURE_RECORD, signed_statement, unsigned_reply_sha256
from fedfusion.common.roster import load_signing_key, sign

#: The node-config key naming the site's private key; the same key as client/secagg_identity.py's.
SIGNING_KEY_NODE_KEY = "signing-key"


@lru_cache(maxsize=4)
def _key(path: str) -> ec.EllipticCurvePrivateKey:
    return load_signing_key(path)


def reply_signing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Add a ``site-signature`` record to the reply when the node config names a signing key."""
    reply = call_next(msg, context)
    path = context.node_config.get(SIGNING_KEY_NODE_KEY)
    if not path or not reply.has_content():
        return reply
    site_id = str(context.node_config.get("site-id", ""))
    statement = signed_statement(context.run_id, msg.metadata.message_id, site_id, unsigned_reply_sha256(reply))
    reply.content.config_records[SIGNATURE_RECORD] = ConfigRecord(
        {"site-id": site_id, "signature": sign(_key(str(path)), PURPOSE, statement)})
    return reply
