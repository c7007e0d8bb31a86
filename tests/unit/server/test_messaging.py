"""send_and_collect: every reply that arrives in time, none waited for longer than needed."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace

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
