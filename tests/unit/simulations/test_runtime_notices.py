"""Flower's run_simulation deprecation, Ray's accelerator FutureWarning and the forwarded "Manually terminating
ClientAppActor" worker lines are hidden; nothing else is."""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Callable, Iterator

import pytest
from flwr.supercore.logger import warn_deprecated_feature

from fedfusion.simulations.runtime_notices import FLOWER_DEPRECATION, known_notices_hidden

#: What an actor writes when Flower's Ray backend terminates it (flwr's console handler, colour on).
ACTOR_SHUTDOWN = "\x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor"

RAY_TIP = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var if "
           "num_gpus=0 or num_gpus=None (default).")


@pytest.fixture
def flower_log() -> Iterator[io.StringIO]:
    """What Flower's logger passes to its handlers (its own console handler writes to whatever stderr
    was when flwr was imported, which pytest's capture may not see)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


def test_the_two_known_notices_are_hidden_inside_the_block(flower_log: io.StringIO) -> None:
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with known_notices_hidden():
            warn_deprecated_feature(f"{FLOWER_DEPRECATION} and will be removed in a future version of Flower.")
            warnings.warn(RAY_TIP, FutureWarning, stacklevel=1)
    assert "DEPRECATED FEATURE" not in flower_log.getvalue()
    assert [str(w.message) for w in shown] == []


def test_other_notices_still_reach_the_user(flower_log: io.StringIO) -> None:
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with known_notices_hidden():
            warn_deprecated_feature("The `other` function is deprecated")
            warnings.warn("something else will change", FutureWarning, stacklevel=1)
        warn_deprecated_feature(f"{FLOWER_DEPRECATION} (outside the block)")
        warnings.warn(RAY_TIP, FutureWarning, stacklevel=1)
    assert "The `other` function is deprecated" in flower_log.getvalue()
    assert "(outside the block)" in flower_log.getvalue()
    assert [str(w.message) for w in shown] == ["something else will change", RAY_TIP]


@pytest.fixture
def forwarded(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
              ) -> Iterator[Callable[[list[str], int], list[str]]]:
    """Hand worker lines to Ray's own driver-side printer (what its log thread calls for every batch
    an actor writes) and return what it printed after the "(ClientAppActor pid=N) " prefix."""
    from ray._private.worker import print_to_stdstream

    monkeypatch.setenv("RAY_COLOR_PREFIX", "0")  # a plain prefix to split on

    def forward(lines: list[str], pid: int) -> list[str]:
        print_to_stdstream({"ip": "10.0.0.1", "localhost": "10.0.0.1", "pid": pid, "job": "", "is_err": True,
                            "actor_name": "ClientAppActor", "task_name": "", "lines": lines}, ignore_prefix=False)
        printed = capsys.readouterr().err.splitlines()
        assert all(line.startswith(f"(ClientAppActor pid={pid}) ") for line in printed), printed
        return [line.split(") ", 1)[1] for line in printed]

    yield forward


def test_actor_shutdown_lines_are_dropped_and_actor_errors_still_show(
        forwarded: Callable[[list[str], int], list[str]]) -> None:
    error = "ERROR :   ClientApp raised an exception: CUDA out of memory"
    longer = "ERROR :   Manually terminating ClientAppActor failed: actor already dead"
    with known_notices_hidden():
        assert forwarded([ACTOR_SHUTDOWN, error, longer], 91001) == [error, longer]
        assert forwarded([ACTOR_SHUTDOWN], 91002) == []


def test_actor_shutdown_lines_show_outside_the_block_and_a_users_skip_pattern_is_kept(
        forwarded: Callable[[list[str], int], list[str]]) -> None:
    from ray._private.ray_logging import stderr_deduplicator, stdout_deduplicator

    theirs = re.compile("noisy library line")  # as RAY_DEDUP_LOGS_SKIP_REGEX would set it
    before, before_err = stdout_deduplicator.skip_re, stderr_deduplicator.skip_re
    stderr_deduplicator.skip_re = theirs
    try:
        with known_notices_hidden():
            assert forwarded(["noisy library line 1", ACTOR_SHUTDOWN, "kept line"], 91003) == ["kept line"]
        assert stderr_deduplicator.skip_re is theirs and stdout_deduplicator.skip_re is before
        assert forwarded([ACTOR_SHUTDOWN], 91004) == [ACTOR_SHUTDOWN]
    finally:
        stderr_deduplicator.skip_re = before_err
