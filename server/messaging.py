"""Sending a round's messages and collecting the replies through Flower's Grid, without idle waits.

Flower 1.41's deployment Grid (``HttpGrid.send_and_receive``) sleeps a fixed 3 s between polls for
replies, so a round whose sites answer in one second still waits up to three. The Grid's public
``push_messages``/``pull_messages`` are the same calls ``send_and_receive`` makes; polling them at a
short interval keeps the protocol Flower's and removes the idle time (measured in
``benchmarks/deployment_overhead.py``). The in-memory Grid of the simulation runtime works the same way.

Every reply the coordinator receives is also recorded (:class:`RecordingGrid`, ``replies.jsonl`` in
the run folder): node, round, message type and the payload's SHA-256 computed by
:func:`fedfusion.common.reply_digest.reply_sha256`, the very function each site's audit log uses. A
site's auditor can then match every line of the site's audit log with exactly one reply the
coordinator received, and the coordinator can show it received nothing else. That function keeps the
hash of the reply's tensors with the reply object, so the signature check that follows
(server/reply_attribution.py) does not hash the same megabytes again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedfusion.common.flower_adapter import use_short_grid_pull_backoff
from fedfusion.common.records import SITE_KEY
from fedfusion.common.reply_digest import message_round, reply_sha256
from fedfusion.common.results import append_line

DEFAULT_POLL_INTERVAL_S = 0.1
#: A reply is listed before the site has stored all of its objects; Flower's Grid then retries after 1 s,
#: 2 s, ... (measured: ~1 s of every round on loopback). Ours: after 20 ms, doubling up to 0.25 s (a cap of
#: 0.5 s still left ~0.4 s between a reply's last object and its pull).
GRID_PULL_INITIAL_BACKOFF_S = 0.02
GRID_PULL_BACKOFF_CAP_S = 0.25
REPLIES_FILENAME = "replies.jsonl"


class ReplyLog:
    """``replies.jsonl``: one JSON line per reply received (append-only, one ``write`` per line)::

        {"time": "...", "run_id": 4711, "node_id": 123, "site_id": "study-16", "round": 2,
         "message_type": "train", "error": false, "sha256": "9f2c..."}

    ``site_id`` is what the reply itself names (train/evaluate replies carry it; secure-aggregation
    stages do not: "" there), ``round`` the server round of the message it answers, read as the site's
    audit reads it (:func:`~fedfusion.common.reply_digest.message_round`; a reply does not carry it).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def record(self, reply: Message, server_round: int | None) -> dict[str, Any]:
        """Append ``reply``'s line; ``server_round``: the round of the message it answers."""
        meta = reply.metadata
        site = ""
        if reply.has_content() and SITE_KEY in reply.content.config_records:
            site = str(reply.content.config_records[SITE_KEY].get("site-id", ""))
        line = {"time": datetime.now(UTC).isoformat(timespec="microseconds"), "run_id": int(meta.run_id),
                "node_id": int(meta.src_node_id), "site_id": site, "round": server_round,
                "message_type": str(meta.message_type), "error": bool(reply.has_error()),
                "sha256": reply_sha256(reply)}
        append_line(self.path, json.dumps(line, separators=(",", ":")).encode() + b"\n")
        return line


def read_replies(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a ``replies.jsonl`` ([] when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ForwardingGrid(Grid):
    """A Grid that hands every call to the wrapped one: the base of the wrappers that watch replies
    (:class:`RecordingGrid` here, ``AttributingGrid`` in server/reply_attribution.py), so each of them
    overrides only the calls it watches."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class RecordingGrid(ForwardingGrid):
    """A Grid that records every reply it hands out in a :class:`ReplyLog`; everything else is the
    wrapped Grid's. Wrapping the Grid (not each caller) means no reply can reach the round loop,
    the secure-aggregation stages or evaluation unrecorded."""

    def __init__(self, grid: Grid, replies: ReplyLog) -> None:
        super().__init__(grid)
        self.replies = replies
        self._rounds: dict[str, int] = {}  # pushed message id -> its round, until its reply is pulled

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        self._rounds.update(zip(ids, (message_round(m) for m in messages), strict=False))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        arrived = list(self.grid.pull_messages(message_ids))
        for reply in arrived:
            self.replies.record(reply, self._rounds.pop(str(reply.metadata.reply_to_message_id), None))
        return arrived

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        by_node = {int(m.metadata.dst_node_id): message_round(m) for m in messages}
        arrived = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in arrived:
            self.replies.record(reply, by_node.get(int(reply.metadata.src_node_id)))
        return arrived


def send_and_collect(grid: Grid, messages: Iterable[Message], *, timeout: float | None,
                     poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> list[Message]:
    """Push ``messages``; return the replies that arrive before ``timeout`` seconds (None: wait for all).

    Replies are returned in arrival order; a site that does not answer in time is simply absent,
    exactly as with ``Grid.send_and_receive``, so callers count missing replies as dropouts.
    """
    use_short_grid_pull_backoff(GRID_PULL_INITIAL_BACKOFF_S, GRID_PULL_BACKOFF_CAP_S)  # idempotent
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_interval_s)
    return replies
