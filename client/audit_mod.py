"""The audit log as a Flower ClientApp mod: every reply that leaves the site is recorded first.

A mod wraps the whole ClientApp (train, evaluate and the secure-aggregation stages alike), so no
message type can leave unrecorded, and the handlers stay free of audit code. The record is written
*before* the reply is returned to Flower for sending; if it cannot be written (disk full, damaged
file), the exception turns the reply into Flower's error reply and the update does not leave: a site
that cannot account for what it sends does not send it.

Which log: the node config's ``audit-log`` (``fedfusion site start`` sets it from ``site.toml``).
Without it (simulation, development) the mod passes replies through untouched.

The payload hash is :func:`fedfusion.common.reply_digest.reply_sha256`'s, the function the coordinator
applies to every reply it receives, so the two records of one reply can be matched. The tensors' part
of it was usually computed already, by the signing mod inside this one (over the same tensors, without
the signature record): :func:`~fedfusion.common.reply_digest.reply_tensors_sha256` reuses it, and the
metrics, signature included, are hashed here.
"""

from __future__ import annotations

from flwr.app import Context, Message

from fedfusion.client.audit import AuditLog
from fedfusion.common.flower_adapter import ClientAppCallable
from fedfusion.common.reply_digest import message_round, reply_payload, reply_tensors_sha256

AUDIT_LOG_NODE_CONFIG_KEY = "audit-log"


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Record the reply in the site's audit log (when configured), then hand it to Flower."""
    reply = call_next(msg, context)
    path = context.node_config.get(AUDIT_LOG_NODE_CONFIG_KEY)
    if not path:
        return reply
    tensors, metrics = reply_payload(reply)
    server_round = message_round(msg)
    site_id = str(context.node_config.get("site-id", "")) or f"node-{context.node_id}"
    epsilon = next((float(v) for k, v in metrics.items() if k.endswith("/epsilon")
                    and isinstance(v, int | float)), None)
    AuditLog(str(path), site_id).record_reply(tensors, metrics, run_id=context.run_id, server_round=server_round,
                                              message_type=msg.metadata.message_type, epsilon=epsilon,
                                              node_id=int(context.node_id),
                                              tensors_sha256=reply_tensors_sha256(reply, tensors))
    return reply
