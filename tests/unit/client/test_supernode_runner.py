"""The SuperNode runner only shortens Flower's idle sleeps, and fails loudly if Flower changes shape."""

from __future__ import annotations

import inspect
import time

import pytest

from fedfusion.client import supernode_runner
from tests.pull_fakes import late_object


def test_flowers_supernode_loop_still_idles_with_time_sleep() -> None:
    # Canary: the runner works by capping this module's `time.sleep`; if Flower stops idling this
    # way, the cap silently does nothing and this test must tell us.
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)
    assert "import time" in source and "time.sleep(3)" in source


def test_the_cap_applies_to_flowers_module_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal

    monkeypatch.setattr(start_client_internal, "time", time)
    monkeypatch.setattr(start_client_internal, "pull_objects", start_client_internal.pull_objects)
    supernode_runner.install_poll_interval(0.05)
    began = time.monotonic()
    start_client_internal.time.sleep(3)
    assert time.monotonic() - began < 1.0
    assert start_client_internal.time.monotonic() > 0  # the rest of `time` is untouched
    assert time.sleep is not start_client_internal.time.sleep  # the real module is unchanged


@pytest.mark.parametrize("bad", [0.0, -1.0, 61.0])
def test_out_of_range_poll_interval_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="poll interval"):
        supernode_runner.install_poll_interval(bad)


def test_idle_polls_wait_the_poll_interval_and_local_waits_far_less(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower sleeps 3 s between idle polls of the SuperLink and 0.5 s between local checks for its
    # ClientApp's reply (and for a reply object): the first becomes the poll interval, the second 20 ms.
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    stand_in = supernode_runner._capped_time_module(0.25)
    for seconds in (3, 1.0, 0.5, 0.01):
        stand_in.sleep(seconds)
    assert slept == [0.25, 0.25, supernode_runner.LOCAL_WAIT_S, 0.01]
    assert supernode_runner.LOCAL_WAIT_S == 0.02


def test_the_supernode_pulls_a_late_object_within_a_fraction_of_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal

    monkeypatch.setattr(start_client_internal, "time", time)
    monkeypatch.setattr(start_client_internal, "pull_objects", start_client_internal.pull_objects)
    supernode_runner.install_poll_interval(0.25)
    supernode_runner.install_poll_interval(0.25)  # again (a restart in-process): must not nest
    pull_one, asked = late_object(3, b"content")  # stored only on the third ask: the sender is still pushing

    began = time.monotonic()
    assert start_client_internal.pull_objects(["a"], pull_object_fn=pull_one) == {"a": b"content"}
    # Flower's own backoff would have waited 1 s + 2 s (±20 %) here; ours 20 ms + 40 ms (±20 %).
    assert len(asked) == 3 and 0.04 <= asked[-1] - began < 0.5
    pull = start_client_internal.pull_objects
    assert pull.keywords == {"initial_backoff": 0.02, "backoff_cap": 0.25, "max_tries_per_object": None}
    assert not hasattr(pull.func, "keywords")  # Flower's own function, wrapped once
