"""What a site signs so the coordinator can attribute each reply to a roster site, not a self-declared id.

Why: a reply's ``site-id`` is whatever the sending process wrote, so one hospital (or anyone holding a
registered node key) could report metrics or updates *as another hospital*. With a roster
(:mod:`fedfusion.common.roster`: site id -> public key) the site signs every reply it sends with its own
node-authentication key, and the coordinator keeps only replies whose signature verifies under the
roster key of the site the reply names.

The signed statement binds the reply to its request, so it cannot be replayed into another run, round
or message: canonical JSON (sorted keys, no spaces) of ``{"run": run id, "reply_to": the request's
message id, "site": site id, "sha256": digest}``, signed for purpose :data:`PURPOSE`. ``digest`` is
:func:`fedfusion.common.reply_digest.payload_sha256` of the reply *without* its signature record (the
record cannot sign itself); the signature record is ``site-signature`` = ``{"site-id", "signature"}``.
Both sides use this module, so they hash and frame identically. No Flower import.
"""

from __future__ import annotations

from typing import Any

from fedfusion.common.reply_digest import canonical, reply_sha256

SIGNATURE_RECORD = "site-signature"
PURPOSE = "reply/v1"


def unsigned_reply_sha256(reply: Any) -> str:
    """:func:`~fedfusion.common.reply_digest.payload_sha256` of a reply's content minus its ``site-signature``
    record.

    The tensors are hashed once per reply object and shared with :func:`reply_sha256` (the audit line,
    ``replies.jsonl``), so signing and recording one reply walk its megabytes once, not twice.
    """
    return reply_sha256(reply, without_prefix=f"{SIGNATURE_RECORD}/")


def signed_statement(run_id: int, reply_to: str, site_id: str, digest: str) -> bytes:
    """The exact bytes a site signs for one reply (see the module docstring)."""
    return canonical({"run": int(run_id), "reply_to": str(reply_to), "site": str(site_id), "sha256": digest})
