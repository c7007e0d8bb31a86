"""send_and_collect: every reply that arrives in time, none waited for longer than needed."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace

import pytest

from fedfusion.server.messaging import send_and_collect


class _FakeGrid:
    """Replies to message i become available `delays[i]` seconds after the push."""

    def __init__(self, delays: list[float | None]):
        self.delays = delays
        self.pulls = 0

    def push_messages(self, messages: Iterable[object]) -> list[str]:
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: Iterable[str]) -> list[SimpleNamespace]:
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        ready = []
        for message_id in ids:
            delay = self.delays[int(message_id[1:])]
            if delay is not None and delay <= now:
                ready.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id)))
        return ready


def test_returns_as_soon_as_the_last_reply_arrives() -> None:
    grid = _FakeGrid([0.05, 0.2, 0.1])
    began = time.monotonic()
    replies = send_and_collect(grid, [1, 2, 3], timeout=10, poll_interval_s=0.02)  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert time.monotonic() - began < 1.0  # Flower's own send_and_receive would sleep 3 s here


def test_a_silent_site_is_absent_after_the_timeout() -> None:
    grid = _FakeGrid([0.01, None])
    began = time.monotonic()
    replies = send_and_collect(grid, [1, 2], timeout=0.3, poll_interval_s=0.02)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.3 <= time.monotonic() - began < 2.0


@pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime
def test_every_reply_received_is_recorded_with_the_audit_hash(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """RecordingGrid: one replies.jsonl line per reply pulled, hashed exactly as the site's audit does."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
    from flwr.common.constant import ErrorCode

    from fedfusion.common.reply_digest import payload_sha256
    from fedfusion.server.messaging import RecordingGrid, ReplyLog, read_replies

    trains = []
    for node, message_id in ((11, "m1"), (12, "m2")):  # replies carry no round: it comes from what they answer
        trains.append(Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=node,
                              message_type="train"))
        trains[-1].metadata.__dict__["_message_id"] = message_id  # as Flower's Grid sets it when pushing
    good = Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))}),
                               "metrics": MetricRecord({"num-examples": 9}),
                               "site": ConfigRecord({"site-id": "study-16"})}), reply_to=trains[0])
    bad = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "refused"), reply_to=trains[1])

    class Inner:
        def push_messages(self, messages: Iterable[Message]) -> list[str]:
            return [m.metadata.message_id for m in messages]

        pulled = False

        def pull_messages(self, ids: Iterable[str]) -> list[Message]:
            first, self.pulled = not self.pulled, True
            return [good, bad] if first else []

    log = tmp_path / "run" / "replies.jsonl"
    grid = RecordingGrid(Inner(), ReplyLog(log))  # type: ignore[arg-type]
    assert send_and_collect(grid, trains, timeout=0.2, poll_interval_s=0.02) == [good, bad]
    lines = read_replies(log)
    assert [(r["site_id"], r["round"], r["message_type"], r["error"]) for r in lines] == [
        ("study-16", 2, "train", False), ("", 2, "train", True)]
    assert lines[0]["sha256"] == payload_sha256({"arrays/w": np.ones(3, dtype=np.float32)},
                                                {"metrics/num-examples": 9, "site/site-id": "study-16"})
    assert lines[1]["sha256"] == payload_sha256({}, {"error": "refused"})
