"""The SHA-256 of a reply's payload, computed the same way by the site and the coordinator.

Why one module for both: a site's audit log records, for every reply that leaves it, the hash of what
it carried (:mod:`fedfusion.client.audit`); the coordinator records the hash of every reply it
received (``replies.jsonl`` in the run folder, :mod:`fedfusion.server.messaging`). An auditor
compares the two sets. They can only be compared if both sides hash with this very code, so neither
side keeps a copy of it. Only numpy and the standard library are imported here: ``fedfusion site
audit`` must start instantly.

What is hashed (:func:`payload_sha256`):

* for each tensor, in sorted name order: an 8-byte big-endian length, then the canonical JSON header
  ``{"dtype": <numpy dtype.str, e.g. "<f4">, "name": ..., "shape": [...]}`` (keys sorted, no spaces);
  an 8-byte big-endian length, then the array's bytes in C order (``np.ascontiguousarray(a).tobytes()``);
* then an 8-byte big-endian length and the metrics as canonical JSON (keys sorted, no spaces, numpy
  scalars as Python numbers, non-finite floats as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``,
  ``bytes`` as ``{"nbytes": n, "sha256": hex}``).

Length prefixes make the framing unambiguous (no two different payloads share a byte stream).

Which tensors and metrics a Flower reply carries (:func:`reply_payload`): every ArrayRecord array as
``"<record>/<key>"``; every MetricRecord and ConfigRecord value as ``"<record>/<key>"`` (a list of
byte strings, e.g. secure-aggregation ciphertexts, as its total size, item count and the SHA-256 of
the length-framed items); an error reply as ``{"error": <reason>}``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """Metrics as plain JSON values; non-finite floats become strings so every line is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, bytes):
        return {"sha256": hashlib.sha256(value).hexdigest(), "nbytes": len(value)}  # never the bytes themselves
    raise TypeError(f"metric value of type {type(value).__name__} cannot be logged")


def canonical(obj: Any) -> bytes:
    """Compact JSON with sorted keys: the one byte form both sides hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def payload_sha256(tensors: Mapping[str, np.ndarray], metrics: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a reply's tensors and metrics, as defined in this module's docstring."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        header = {"dtype": array.dtype.str, "name": name, "shape": list(array.shape)}
        digest.update(_framed(canonical(header)))
        digest.update(_framed(array.tobytes(order="C")))
    digest.update(_framed(canonical(jsonable(metrics))))
    return digest.hexdigest()


def _bytes_list_summary(values: list[bytes]) -> dict[str, Any]:
    """A list of byte strings described by size and a hash of its framed items (content-binding)."""
    digest = hashlib.sha256()
    for value in values:
        digest.update(_framed(bytes(value)))
    return {"bytes": sum(len(v) for v in values), "items": len(values), "sha256": digest.hexdigest()}


def reply_payload(reply: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, metrics) exactly as a Flower ``Message`` reply carries them; bytes are described, not
    copied. Duck-typed (no Flower import), so the audit CLI stays fast."""
    tensors: dict[str, np.ndarray] = {}
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
            if isinstance(value, list) and value and isinstance(value[0], bytes):
                value = _bytes_list_summary(value)  # ciphertexts and keys: size and hash only
            metrics[f"{record_name}/{key}"] = value
    return tensors, metrics


def reply_sha256(reply: Any) -> str:
    """:func:`payload_sha256` of a Flower reply: what the site's audit line records for it."""
    return payload_sha256(*reply_payload(reply))


def message_round(msg: Any) -> int:
    """The server round of an incoming (server -> site) message: Flower's strategies and our
    secure-aggregation stages put it in ``group_id``; the train/evaluate config also carries
    ``server-round``. Both the site's audit line and the coordinator's record of the reply use this."""
    group = str(msg.metadata.group_id or "")
    if group.isdigit():
        return int(group)
    config = msg.content.config_records.get("config") if msg.has_content() else None
    return int(config.get("server-round", 0)) if config is not None else 0
