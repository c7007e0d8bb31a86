"""The coordinator attributes each reply to the roster site whose key signed it (run config ``roster``).

Why: without this the site id in a reply is self-declared (see :mod:`fedfusion.common.reply_signature`).
With ``roster = "/kit/roster.json"`` in the run config (the coordinator kit's roster), every reply with
content must carry a ``site-signature`` that verifies under the roster key of the site it names, for
this run and this very request, and any ``site-id`` the reply names elsewhere must be that site. A reply
that fails is replaced by an error reply naming the reason before any strategy sees it: it is not
averaged, it shows in the run's rejected replies (train) and is logged; ``replies.jsonl`` still records
what arrived (the wrapped :class:`~fedfusion.server.messaging.RecordingGrid` sits below this one).

Without a roster (simulation, development) nothing changes: replies are attributed as they claim.

The signed digest is recomputed here from the reply itself; its tensors' part was already hashed for
``replies.jsonl`` and is reused (:func:`fedfusion.common.reply_digest.reply_tensors_sha256`), so each
reply's tensors are hashed once on the coordinator.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import Error, Message
from flwr.serverapp import Grid

from fedfusion.common.flower_adapter import ErrorCode
from fedfusion.common.flower_adapter import flower_log as log
from fedfusion.common.records import SITE_KEY
from fedfusion.common.reply_signature import PURPOSE, SIGNATURE_RECORD, signed_statement, unsigned_reply_sha256
from fedfusion.common.roster import Roster
from fedfusion.server.messaging import ForwardingGrid

ROSTER_RUN_CONFIG_KEY = "roster"


def attribute_reply(reply: Message, roster: Roster) -> tuple[str | None, str]:
    """(roster site id, "") when ``reply``'s signature proves its sender; (None, why) otherwise."""
    if reply.has_error():
        return None, ""
    record = reply.content.config_records.get(SIGNATURE_RECORD)
    if record is None or not isinstance(record.get("signature"), bytes):
        return None, "the reply is not signed (site-signature missing); is [auth] private-key set at the site?"
    claimed = str(record.get("site-id", ""))
    meta = reply.metadata
    statement = signed_statement(meta.run_id, meta.reply_to_message_id, claimed, unsigned_reply_sha256(reply))
    if not roster.verify(claimed, PURPOSE, statement, record["signature"]):
        return None, (f"the reply claims site {claimed!r} but its signature does not verify under that site's key in "
                      f"{roster.source} (another site's reply, or altered after signing)")
    named = reply.content.config_records.get(SITE_KEY)
    if named is not None and str(named.get("site-id", claimed)) != claimed:
        return None, f"the reply names site {named.get('site-id')!r} but was signed by site {claimed!r}"
    return claimed, ""


class AttributingGrid(ForwardingGrid):
    """A Grid whose replies are verified against a roster; unverifiable ones become error replies.

    ``refused`` lists ``{"node_id", "claimed", "reason"}`` for every reply turned away.
    """

    def __init__(self, grid: Grid, roster: Roster) -> None:
        super().__init__(grid)
        self.roster = roster
        self.refused: list[dict[str, Any]] = []
        self._requests: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        self._requests.update(zip(ids, messages, strict=False))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        arrived = list(self.grid.pull_messages(message_ids))
        return [self._checked(r, self._requests.pop(str(r.metadata.reply_to_message_id), None)) for r in arrived]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        arrived = list(self.grid.send_and_receive(messages, timeout=timeout))
        by_id = {str(m.metadata.message_id): m for m in messages}
        return [self._checked(r, by_id.get(str(r.metadata.reply_to_message_id))) for r in arrived]

    def _checked(self, reply: Message, request: Message | None) -> Message:
        site, reason = attribute_reply(reply, self.roster)
        if site is not None or not reason:
            return reply
        record = reply.content.config_records.get(SIGNATURE_RECORD)
        claimed = str(record.get("site-id", "")) if record is not None else ""
        self.refused.append({"node_id": int(reply.metadata.src_node_id), "claimed": claimed, "reason": reason})
        log(WARNING, "reply from node %s refused: %s", reply.metadata.src_node_id, reason)
        if request is None:  # cannot happen through push/pull; never hand an unverified reply on
            raise RuntimeError(f"reply from node {reply.metadata.src_node_id} refused and its request is unknown: "
                               f"{reason}")
        return Message(Error(code=ErrorCode.UNKNOWN, reason=f"refused by the coordinator: {reason}"), reply_to=request)


def attributing(grid: Grid, run_config: dict[str, Any]) -> Grid:
    """``grid`` wrapped in an :class:`AttributingGrid` when the run config names a roster, else unchanged."""
    path = str(run_config.get(ROSTER_RUN_CONFIG_KEY, "") or "")
    return AttributingGrid(grid, Roster.load(path)) if path else grid
