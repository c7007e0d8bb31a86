"""The SuperNode runner only shortens Flower's idle sleeps, and fails loudly if Flower changes shape."""

from __future__ import annotations

import inspect
import time

import pytest

from fedfusion.client import supernode_runner


def test_flowers_supernode_loop_still_idles_with_time_sleep() -> None:
    # Canary: the runner works by capping this module's `time.sleep`; if Flower stops idling this
    # way, the cap silently does nothing and this test must tell us.
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)
    assert "import time" in source and "time.sleep(3)" in source


def test_the_cap_applies_to_flowers_module_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal

    monkeypatch.setattr(start_client_internal, "time", time)
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
