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

Each reply is hashed over its tensors once per side (:func:`reply_tensors_sha256`): the site's signing
mod and audit mod, and the coordinator's ``replies.jsonl`` and signature check, each need a digest of
the same tensors with different metrics (with and without the ``site-signature`` record), and the
tensors are megabytes while the metrics are a few hundred bytes. The SHA-256 state after the tensors is
kept per ``Message`` object and finished with each metrics variant, so every digest is byte for byte
the one :func:`payload_sha256` gives.
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hashlib import _Hash as HashState
else:
    HashState = Any


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


def tensors_sha256(tensors: Mapping[str, np.ndarray]) -> HashState:
    """The SHA-256 state after the tensors' part of :func:`payload_sha256` (everything but the metrics).

    Finish it with :func:`finish_sha256`, once per metrics variant: the tensors are the expensive part.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        header = {"dtype": array.dtype.str, "name": name, "shape": list(array.shape)}
        digest.update(_framed(canonical(header)))
        digest.update(_framed(array.tobytes(order="C")))
    return digest


def finish_sha256(tensors_digest: HashState, metrics: Mapping[str, Any]) -> str:
    """:func:`payload_sha256` from a :func:`tensors_sha256` state and the metrics; the state is left as it was."""
    digest = tensors_digest.copy()
    digest.update(_framed(canonical(jsonable(metrics))))
    return digest.hexdigest()


def payload_sha256(tensors: Mapping[str, np.ndarray], metrics: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a reply's tensors and metrics, as defined in this module's docstring."""
    return finish_sha256(tensors_sha256(tensors), metrics)


def _bytes_list_summary(values: list[bytes]) -> dict[str, Any]:
    """A list of byte strings described by size and a hash of its framed items (content-binding)."""
    digest = hashlib.sha256()
    for value in values:
        digest.update(_framed(bytes(value)))
    return {"bytes": sum(len(v) for v in values), "items": len(values), "sha256": digest.hexdigest()}


def reply_payload(reply: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, metrics) exactly as a Flower ``Message`` reply carries them; bytes are described, not
    copied. Duck-typed (no Flower import), so the audit CLI stays fast."""
    return reply_tensors(reply), reply_metrics(reply)


def reply_tensors(reply: Any) -> dict[str, np.ndarray]:
    """The tensors part of :func:`reply_payload`: every ArrayRecord array as ``"<record>/<key>"``."""
    tensors: dict[str, np.ndarray] = {}
    if not reply.has_content():
        return tensors
    for record_name, record in reply.content.array_records.items():
        for key, array in record.items():
            tensors[f"{record_name}/{key}"] = array.numpy()
    return tensors


def reply_metrics(reply: Any) -> dict[str, Any]:
    """The metrics part of :func:`reply_payload` (error replies: ``{"error": <reason>}``)."""
    metrics: dict[str, Any] = {}
    if not reply.has_content():
        return {"error": reply.error.reason if reply.has_error() else ""}
    for record_name, record in reply.content.metric_records.items():
        metrics.update({f"{record_name}/{key}": value for key, value in record.items()})
    for record_name, record in reply.content.config_records.items():
        for key, value in record.items():
            if isinstance(value, list) and value and isinstance(value[0], bytes):
                value = _bytes_list_summary(value)  # ciphertexts and keys: size and hash only
            metrics[f"{record_name}/{key}"] = value
    return metrics


# Message -> (fingerprint of its arrays, SHA-256 state after its tensors). Weak keys: an entry lives as
# long as its reply and no longer. Values must not refer to the Message, or the entry would never go.
_TENSOR_DIGESTS: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], HashState]] = weakref.WeakKeyDictionary()


def _arrays_fingerprint(reply: Any) -> tuple[Any, ...] | None:
    """What ``reply``'s tensors are made of: (record, key, serialisation type, data) for every array, in
    the order :func:`reply_tensors` reads them. ``Array.numpy()`` depends on nothing else, so an equal
    fingerprint means equal tensors. The data are immutable ``bytes`` held by reference (comparing the
    same object is an identity check, not a byte walk, and a held object's id cannot be reused); None
    (do not cache) when an array holds anything else, e.g. a ``bytearray`` that could change in place."""
    parts: list[tuple[str, str, Any, bytes]] = []
    for record_name, record in reply.content.array_records.items():
        for key, array in record.items():
            data = getattr(array, "data", None)
            if type(data) is not bytes:
                return None
            parts.append((record_name, key, getattr(array, "stype", None), data))
    return tuple(parts)


def reply_tensors_sha256(reply: Any, tensors: Mapping[str, np.ndarray] | None = None) -> HashState:
    """The :func:`tensors_sha256` state of a reply's tensors, computed once per reply object.

    The site's signing mod and audit mod, and the coordinator's reply log and signature check, all hash
    the same reply: the first call walks the tensors, later calls on the same ``Message`` reuse the state
    while its arrays are unchanged (checked on every call, so adding a record, as the signing mod does,
    or replacing an array never yields a stale digest). ``tensors``: :func:`reply_tensors` of this very
    reply when the caller already has it (the audit mod), used only when the state is not cached.
    Returns a copy: finishing it cannot alter the cached state.
    """
    if not reply.has_content():
        return hashlib.sha256()
    fingerprint = _arrays_fingerprint(reply)
    try:
        cached = _TENSOR_DIGESTS.get(reply) if fingerprint is not None else None
    except TypeError:  # a stand-in reply that cannot be weakly referenced or hashed: no cache
        fingerprint, cached = None, None
    if cached is not None and cached[0] == fingerprint:
        return cached[1].copy()
    state = tensors_sha256(reply_tensors(reply) if tensors is None else tensors)
    if fingerprint is not None:
        _TENSOR_DIGESTS[reply] = (fingerprint, state.copy())
    return state


def reply_sha256(reply: Any, *, without_prefix: str | None = None) -> str:
    """:func:`payload_sha256` of a Flower reply: what the site's audit line records for it.

    ``without_prefix``: leave out the metrics whose name starts with it (the signature record, see
    :func:`fedfusion.common.reply_signature.unsigned_reply_sha256`). The tensors are hashed once per reply
    (:func:`reply_tensors_sha256`).
    """
    metrics = reply_metrics(reply)
    if without_prefix is not None:
        metrics = {k: v for k, v in metrics.items() if not k.startswith(without_prefix)}
    return finish_sha256(reply_tensors_sha256(reply), metrics)


def message_round(msg: Any) -> int:
    """The server round of an incoming (server -> site) message: Flower's strategies and our
    secure-aggregation stages put it in ``group_id``; the train/evaluate config also carries
    ``server-round``. Both the site's audit line and the coordinator's record of the reply use this."""
    group = str(msg.metadata.group_id or "")
    if group.isdigit():
        return int(group)
    config = msg.content.config_records.get("config") if msg.has_content() else None
    return int(config.get("server-round", 0)) if config is not None else 0
