"""A stand-in for Flower's per-object pull: the object is stored only on the N-th ask, as when the sender
is still pushing it. Used to time the pull backoff of the SuperNode and of the coordinator's Grid."""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError


def late_object(stored_on_ask: int, content: bytes) -> tuple[Callable[[str], bytes], list[float]]:
    """(pull function, the monotonic time of every ask): unavailable until ask ``stored_on_ask``."""
    asked: list[float] = []

    def pull_one(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) < stored_on_ask:
            raise ObjectUnavailableError(object_id)
        return content

    return pull_one, asked
