"""Sending a round's messages and collecting the replies through Flower's Grid, without idle waits.

Flower 1.41's deployment Grid (``HttpGrid.send_and_receive``) sleeps a fixed 3 s between polls for
replies, so a round whose sites answer in one second still waits up to three. The Grid's public
``push_messages``/``pull_messages`` are the same calls ``send_and_receive`` makes; polling them at a
short interval keeps the protocol Flower's and removes the idle time (measured in
``benchmarks/deployment_overhead.py``). The in-memory Grid of the simulation runtime works the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

DEFAULT_POLL_INTERVAL_S = 0.1


def send_and_collect(grid: Grid, messages: Iterable[Message], *, timeout: float | None,
                     poll_interval_s: float = DEFAULT_POLL_INTERVAL_S) -> list[Message]:
    """Push ``messages``; return the replies that arrive before ``timeout`` seconds (None: wait for all).

    Replies are returned in arrival order; a site that does not answer in time is simply absent,
    exactly as with ``Grid.send_and_receive``, so callers count missing replies as dropouts.
    """
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
