"""The audit log as a Flower ClientApp mod: every reply that leaves the site is recorded first.

A mod wraps the whole ClientApp (train, evaluate and the secure-aggregation stages alike), so no
message type can leave unrecorded, and the handlers stay free of audit code. The record is written
*before* the reply is returned to Flower for sending; if it cannot be written (disk full, damaged
file), the exception turns the reply into Flower's error reply and the update does not leave: a site
that cannot account for what it sends does not send it.

Which log: the node config's ``audit-log`` (``fedfusion site start`` sets it from ``site.toml``).
Without it (simulation, development) the mod passes replies through untouched.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedfusion.client.audit import AuditLog

AUDIT_LOG_NODE_CONFIG_KEY = "audit-log"


def _reply_payload(reply: Message) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, metrics) exactly as the reply carries them; bytes are described, not copied."""
    tensors: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    if not reply.has_content():
        return tensors, {"error": reply.error.reason if reply.has_error() else ""}
    for record_name, record in reply.content.array_records.items():
        for key, array in record.items():
            tensors[f"{record_name}/{key}"] = array.numpy()
    for record_name, record in reply.content.metric_records.items():
        metrics.update({f"{record_name}/{key}": value for key, value in record.items()})
    for record_name, record in reply.content.config_records.items():
        for key, value in record.items():
            if isinstance(value, bytes):
                value = {"bytes": len(value)}  # ciphertexts and keys: size only
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = {"bytes": sum(len(v) for v in value), "items": len(value)}
            metrics[f"{record_name}/{key}"] = value
    return tensors, metrics


def _round_of(msg: Message) -> int:
    """The server round: Flower's strategies and our secure-aggregation stages put it in ``group_id``;
    the train/evaluate config also carries ``server-round``."""
    group = str(msg.metadata.group_id or "")
    if group.isdigit():
        return int(group)
    config = msg.content.config_records.get("config") if msg.has_content() else None
    return int(config.get("server-round", 0)) if config is not None else 0


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Record the reply in the site's audit log (when configured), then hand it to Flower."""
    reply = call_next(msg, context)
    path = context.node_config.get(AUDIT_LOG_NODE_CONFIG_KEY)
    if not path:
        return reply
    tensors, metrics = _reply_payload(reply)
    server_round = _round_of(msg)
    site_id = str(context.node_config.get("site-id", "")) or f"node-{context.node_id}"
    epsilon = next((float(v) for k, v in metrics.items() if k.endswith("/epsilon")
                    and isinstance(v, int | float)), None)
    AuditLog(str(path), site_id).record_reply(tensors, metrics, run_id=context.run_id, server_round=server_round,
                                              message_type=msg.metadata.message_type, epsilon=epsilon)
    return reply
