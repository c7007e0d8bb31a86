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
(``<ledger stem>-releases/<hash>.npz``), the reply's Flower object tree (its arrays, metrics and
site record), replaced atomically (temp file, fsync, ``os.replace``, fsync of the folder) *before*
the reply is handed to Flower: a reply that left the site is always on disk. Only the newest release
of a study is kept: a resumed run can only ask again for the round after its last checkpoint, which
is the last one this site trained. It holds the update the site already sent, nothing more; it lives
on the site's state volume with the ledger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedfusion.common.reply_digest import canonical, payload_sha256
from fedfusion.common.results import fsync_dir

log = logging.getLogger("fedfusion.client.releases")
_ROOT = "root"
_KEY = "request"


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
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

        path = self._path(site_id, study)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                if bytes(stored[_KEY]).decode() != key:
                    return None
                root = bytes(stored[_ROOT]).decode()
                contents = {name: bytes(stored[name]) for name in stored.files if name not in (_ROOT, _KEY)}
            content = inflate_object_from_contents(root, contents)
            if not isinstance(content, RecordDict):
                raise ValueError("not a stored reply")
        except Exception as err:  # noqa: BLE001 - unreadable: train afresh, which can only over-count ε
            log.warning("%s: cannot read the kept release (%s); this round trains afresh and is charged again",
                        path, err)
            return None
        return content

    def put(self, site_id: str, study: str, key: str, content: RecordDict) -> Path:
        """Keep ``content`` as the release for request ``key`` (replacing the study's previous one)."""
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        objects = {oid: np.frombuffer(obj.deflate(), dtype=np.uint8)
                   for oid, obj in get_all_nested_objects(content).items()}
        path = self._path(site_id, study)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as handle:
            np.savez(handle, **{_ROOT: np.frombuffer(content.object_id.encode(), dtype=np.uint8),
                                _KEY: np.frombuffer(key.encode(), dtype=np.uint8)}, **objects)
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
