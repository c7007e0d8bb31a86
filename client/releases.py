"""The last DP update each study released at this site, so that the same request is answered with
the same release instead of a second round of training (and a second ε charge).

Why: a coordinator can crash after a site trained round k and replied, but before it wrote round k's
checkpoint. ``fedfusion run --resume`` then asks for round k again: same study, same round, same
global model (from checkpoint k - 1), same run settings. Training again would be a new DP release,
charged to the ledger a second time for one round of the study. Sending the first release again is
post-processing of something that already left the site: it costs no ε, and the coordinator gets the
same update bit for bit (the audit log shows the same SHA-256 twice, once per run).

What identifies a request (:func:`request_key`): the site, the study, the round, the run config's
resume-neutral hash (``FederationConfig.config_hash``) and :func:`~fedfusion.common.reply_digest.payload_sha256`
of the incoming global model and train config. Any other run, model or setting trains afresh.

Storage: one file per (site, study) in a folder beside the privacy ledger
(``<ledger stem>-releases/<hash>.npz``) in fedfusion's own format (:data:`RELEASE_FORMAT`: the reply's
tensors as NumPy arrays plus a JSON description of its records, so a Flower upgrade cannot make a kept
release unreadable; files written before it held Flower's serialized object tree and are read once
through :mod:`fedfusion.client.flower_runtime`, then replaced by the next release), replaced
atomically (temp file, fsync, ``os.replace``, fsync of the folder) *before*
the reply is handed to Flower: a reply that left the site is always on disk. Only the newest release
of a study is kept: a resumed run can only ask again for the round after its last checkpoint, which
is the last one this site trained. It holds the update the site already sent, nothing more; it lives
on the site's state volume with the ledger.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedfusion.common.reply_digest import canonical, payload_sha256
from fedfusion.common.results import fsync_dir

log = logging.getLogger("fedfusion.client.releases")
_ROOT = "root"  # only in files written before RELEASE_FORMAT (Flower's object tree)
_KEY = "request"
_FORMAT = "format"
_META = "meta"
#: Written into every release file; a reader meeting another value refuses the file (and trains afresh).
RELEASE_FORMAT = "fedfusion-release/1"
_KINDS: dict[str, type] = {"arrays": ArrayRecord, "metrics": MetricRecord, "config": ConfigRecord}


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


def _json_value(value: Any) -> Any:
    """A config/metric value as JSON; bytes (e.g. a signature) as ``{"b64": ...}``, the one dict form."""
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _from_json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_from_json_value(v) for v in value]
    return value


def encode_release(content: RecordDict) -> dict[str, np.ndarray]:
    """The npz entries of :data:`RELEASE_FORMAT` for ``content`` (records and keys in their order)."""
    records: list[dict[str, Any]] = []
    entries: dict[str, np.ndarray] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            keys = list(record.keys())
            for key in keys:
                entries[f"a{len(entries)}"] = record[key].numpy()
            records.append({"name": name, "kind": "arrays", "keys": keys})
            continue
        kind = next((k for k, cls in _KINDS.items() if k != "arrays" and isinstance(record, cls)), None)
        if kind is None:
            raise ValueError(f"cannot keep record {name!r} of type {type(record).__name__} in a release")
        records.append({"name": name, "kind": kind, "values": {k: _json_value(v) for k, v in record.items()}})
    meta = json.dumps({"records": records}, allow_nan=True)
    return {_FORMAT: _bytes(RELEASE_FORMAT), _META: _bytes(meta), **entries}


def decode_release(stored: Mapping[str, np.ndarray]) -> RecordDict:
    """The ``RecordDict`` of :func:`encode_release`'s entries; a ValueError names what is wrong."""
    found = bytes(stored[_FORMAT]).decode() if _FORMAT in stored else None
    if found != RELEASE_FORMAT:
        raise ValueError(f"release format {found!r}, expected {RELEASE_FORMAT!r}")
    meta = json.loads(bytes(stored[_META]).decode())
    content = RecordDict()
    index = 0
    for record in meta["records"]:
        if record["kind"] == "arrays":
            arrays = {}
            for key in record["keys"]:
                arrays[key] = Array(np.asarray(stored[f"a{index}"]))
                index += 1
            content[record["name"]] = ArrayRecord(arrays)
        else:
            values = {k: _from_json_value(v) for k, v in record["values"].items()}
            content[record["name"]] = _KINDS[record["kind"]](values)
    return content


def request_key(site_id: str, study: str, server_round: int, config_hash: str,
                tensors: dict[str, np.ndarray], config: dict[str, Any]) -> str:
    """SHA-256 naming one training request (see the module docstring)."""
    request = payload_sha256(tensors, config)
    return hashlib.sha256(canonical([site_id, study, int(server_round), config_hash, request])).hexdigest()


class ReleaseStore:
    """``<ledger stem>-releases/``: the newest released train reply per (site, study)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def beside_ledger(cls, ledger: str | Path) -> ReleaseStore:
        ledger = Path(ledger)
        return cls(ledger.with_name(f"{ledger.stem}-releases"))

    def _path(self, site_id: str, study: str) -> Path:
        name = hashlib.sha256(canonical([site_id, study])).hexdigest()[:24]
        return self.folder / f"{name}.npz"

    def get(self, site_id: str, study: str, key: str) -> RecordDict | None:
        """The reply content released for request ``key``, or None (another request, or none kept)."""
        path = self._path(site_id, study)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                if bytes(stored[_KEY]).decode() != key:
                    return None
                if _FORMAT in stored.files or _ROOT not in stored.files:
                    content = decode_release({name: stored[name] for name in stored.files})
                else:  # written before RELEASE_FORMAT: Flower's object tree, read once for the upgrade
                    from fedfusion.client.flower_runtime import read_flower_object_tree

                    root = bytes(stored[_ROOT]).decode()
                    contents = {name: bytes(stored[name]) for name in stored.files if name not in (_ROOT, _KEY)}
                    content = read_flower_object_tree(root, contents)
            if not isinstance(content, RecordDict):
                raise ValueError("not a stored reply")
        except Exception as err:  # noqa: BLE001 - unreadable: train afresh, which can only over-count ε
            log.warning("%s: cannot read the kept release (%s); this round trains afresh and is charged again",
                        path, err)
            return None
        return content

    def put(self, site_id: str, study: str, key: str, content: RecordDict) -> Path:
        """Keep ``content`` as the release for request ``key`` (replacing the study's previous one)."""
        entries = encode_release(content)
        path = self._path(site_id, study)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as handle:
            np.savez(handle, **{_KEY: _bytes(key)}, **entries)  # type: ignore[arg-type]
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(self.folder)
        return path


ANSWERS_FILENAME = "secagg-answers.json"


def answer_key(site_id: str, study: str, server_round: int, tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 naming one secure answer: site, study, round and the global model trained from.

    The run config is left out on purpose: changing an irrelevant setting must not let a coordinator
    ask again for the same (deterministic, or stored) update under a fresh key."""
    return hashlib.sha256(canonical([site_id, study, int(server_round), payload_sha256(tensors, {})])).hexdigest()


class AnswerBook:
    """One answer per round: the survivor set this site vouched for, per :func:`answer_key`.

    Why: a secure round reveals only a sum, but two sums of the *same* update over two site sets reveal
    their difference (sum{1,2,3,4} - sum{2,3,4} = site 1). The same update comes back when the release
    store replays a DP release or when training is deterministic, so a site signs (consistency round)
    and reveals unmask shares for one survivor set per (study, round, global model), ever.

    Refuse, not retrain-and-charge: without DP a retrain is bit-identical (seeded) and charging nothing
    protects nothing; with DP every retrain spends budget at the coordinator's whim. Refusing costs only
    this round's liveness: an honest resumed coordinator asking again with the same survivors is answered.

    ``path`` None keeps the book in memory (``entries``), for callers that persist it themselves.
    """

    def __init__(self, path: str | Path | None = None, entries: dict[str, str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, str] = dict(entries or {})
        if self.path is not None and self.path.is_file():

            try:
                self.entries.update(json.loads(self.path.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, ValueError) as err:
                raise ValueError(f"{self.path}: unreadable secure-aggregation answer book ({err}); it records "
                                 "which survivor set each round was answered for: restore it from backup") from None

    def bind(self, key: str, survivors: str) -> bool:
        """Record ``survivors`` for ``key``; False (and nothing recorded) when another set is bound."""
        bound = self.entries.get(key)
        if bound is not None:
            return bound == survivors
        self.entries[key] = survivors
        if self.path is not None:

            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as handle:
                json.dump(self.entries, handle, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        return True
