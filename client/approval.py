"""Code approval: a site runs only app bundles (FABs) whose SHA-256 its IT team has approved.

Why an allow-list and not Flower's signed FABs: Flower 1.41's SuperNode verifies FAB signatures
(``--trusted-entities``) only for bundles that also carry a ``valid_license`` verification from the
Flower platform, which an offline hospital federation never has. The FAB hash, by contrast, is exactly
what the SuperNode receives and what a coordinator can publish (``fedfusion app-hash``): Flower builds
FABs deterministically, so the same source gives the same hash on every machine.

The check runs in the site's own installed code (the warm SuperExec's task process, before Flower
loads the ClientApp from the FAB), never in the FAB: a bundle cannot approve itself. No byte of the
unapproved code is imported, and no data is read: instead of the bundle's ClientApp, Flower runs
:func:`refusing_app`, site code that answers every message with an error reply (code
``LOAD_CLIENT_APP_EXCEPTION``) naming the hash and the setting to change. That reply goes through the
site's audit mod like any other, so the refusal is in the audit log, and the coordinator sees the
reason (Flower's own load-error reply would only say "An exception was raised when attempting to load
`ClientApp`").
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path

_HASH = re.compile(r"^[0-9a-f]{64}$")


class AppNotApproved(Exception):
    """The run's FAB is not on this site's allow-list."""


def fab_hash(app_dir: str | Path) -> str:
    """SHA-256 of the FAB that ``flwr run APP_DIR`` would send (Flower's own, deterministic build)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def normalise_hashes(values: Iterable[str], source: str) -> frozenset[str]:
    """Lower-case hex digests; anything else is an error naming ``source`` (e.g. the site.toml key)."""
    hashes = set()
    for value in values:
        digest = str(value).strip().lower()
        if not _HASH.match(digest):
            raise ValueError(f"{source}: {value!r} is not a SHA-256 hex digest (64 hex characters); "
                             "get it from the coordinator's `fedfusion app-hash`")
        hashes.add(digest)
    return frozenset(hashes)


def check_approved(digest: str, approved: frozenset[str]) -> None:
    """Raise ``AppNotApproved`` unless ``digest`` is approved (an empty allow-list approves nothing)."""
    if digest.lower() not in approved:
        raise AppNotApproved(
            f"this site has not approved app bundle sha256={digest}; if the coordinator confirms it, add it to "
            "[approval] apps in site.toml and restart the site")


def refusing_app(reason: str) -> Callable[..., object]:
    """A stand-in ClientApp that answers any message with ``reason`` (recorded by the audit mod first)."""
    from flwr.app import Context, Error, Message
    from flwr.common.constant import ErrorCode

    from fedfusion.client.audit_mod import audit_mod

    def refuse(msg: Message, context: Context) -> Message:
        return Message(Error(ErrorCode.LOAD_CLIENT_APP_EXCEPTION, f"refused: {reason}"), reply_to=msg)

    def app(message: Message, context: Context) -> Message:
        return audit_mod(message, context, refuse)

    return app


def install_approval_check(approved: frozenset[str], on_refusal: Callable[[str], None] | None = None) -> None:
    """Make Flower's ClientApp loader (in this process) refuse FABs that are not approved.

    Patches ``get_load_client_app_fn`` as seen by ``run_clientapp``; for an unapproved FAB the loader
    returns :func:`refusing_app` instead of loading anything from the bundle.
    """
    from flwr.supernode.runtime import run_clientapp as flower_module

    flower_loader_factory = flower_module.get_load_client_app_fn

    def approving_loader_factory(*args: object, **kwargs: object) -> Callable[[str, str, str], object]:
        load = flower_loader_factory(*args, **kwargs)

        def load_if_approved(fab_id: str, fab_version: str, fab_hash_str: str) -> object:
            try:
                check_approved(fab_hash_str, approved)
            except AppNotApproved as refused:
                if on_refusal is not None:
                    on_refusal(fab_hash_str)
                return refusing_app(str(refused))
            return load(fab_id, fab_version, fab_hash_str)

        return load_if_approved

    flower_module.get_load_client_app_fn = approving_loader_factory  # type: ignore[assignment]
