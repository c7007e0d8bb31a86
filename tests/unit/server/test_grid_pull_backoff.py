"""send_and_collect makes the deployment Grid pull a reply's late objects within a fraction of a second.

Flower's Grid lists a reply as soon as the site has sent its header, often before the site has pushed all
of the reply's objects; Flower's own pull then retries after 1 s, 2 s, ... (measured: ~1 s per round on
loopback). Flower's real pull function runs here; only the object source is a stand-in.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable
from types import SimpleNamespace

import pytest

from fedfusion.common import flower_adapter
from fedfusion.server import messaging
from tests.pull_fakes import late_object


class _AnsweringGrid:
    """Answers every pushed message at once (the Grid's own pulls are what this test times)."""

    def push_messages(self, messages: Iterable[object]) -> list[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: Iterable[str]) -> list[SimpleNamespace]:
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]


def test_after_send_and_collect_the_grid_pulls_a_late_object_within_half_a_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    grid_module = importlib.import_module(flower_adapter.GRID_MODULE)
    flowers = getattr(grid_module.pull_objects, "_fedfusion_original", grid_module.pull_objects)
    monkeypatch.setattr(grid_module, "pull_objects", flowers)
    assert len(messaging.send_and_collect(_AnsweringGrid(), [object(), object()], timeout=5)) == 2
    pull_one, asked = late_object(4, b"reply")  # stored on the fourth ask: the site is still pushing

    began = time.monotonic()
    assert grid_module.pull_objects(["r"], pull_object_fn=pull_one) == {"r": b"reply"}
    # Flower's backoff: 1 + 2 + 4 s (±20 %); the Grid's after send_and_collect: 0.02 + 0.04 + 0.08 s (±20 %).
    assert len(asked) == 4 and asked[-1] - began < 0.5
    assert grid_module.pull_objects.func is flowers
    assert grid_module.pull_objects.keywords["initial_backoff"] == messaging.GRID_PULL_INITIAL_BACKOFF_S
    assert grid_module.pull_objects.keywords["backoff_cap"] == messaging.GRID_PULL_BACKOFF_CAP_S
