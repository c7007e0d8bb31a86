"""Hide the notices Flower's simulation runtime prints that a researcher can do nothing about.

- Flower 1.41 logs ``DEPRECATED FEATURE: The `run_simulation` function is deprecated ...`` on
  every call. ``flwr run`` would need a SuperLink process per study; the in-process runtime is
  the right tool for ``fedfusion simulate``/``experiment`` until Flower removes it (then this
  module goes, and the tests here say so).
- Ray 2.55 warns ``FutureWarning: Tip: In future versions of Ray, Ray will no longer override
  accelerator visible devices ...`` at ``ray.init``. Setting the variable it names would change
  which GPUs a 0-GPU site sees, so the notice is hidden instead of acted on.

- Flower's Ray backend ends a federation by calling ``terminate`` on every idle ``ClientAppActor``,
  which logs ``WARNING : Manually terminating ClientAppActor`` *inside the actor process*; Ray then
  forwards that worker line to the driver as ``(ClientAppActor pid=...) WARNING : Manually
  terminating ClientAppActor`` (once per actor, or not at all when ``ray.shutdown`` wins the race).
  It is the normal end of every simulation, not news.

All are filtered by their exact text and only while the runtime runs: every other warning, every
other Flower log line and every other line a Ray worker prints (an actor's traceback, Ray's "actor
died" errors) still reaches the user.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

#: Start of the message Flower passes to ``warn_deprecated_feature`` in ``flwr.simulation.run_simulation``.
FLOWER_DEPRECATION = "The `run_simulation` function is deprecated"
#: Start of Ray's FutureWarning in ``ray._private.worker.init`` (a regular expression for ``filterwarnings``).
RAY_ACCELERATOR_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator"
#: A forwarded Ray worker line that is only Flower's actor-shutdown notice (message last on the line;
#: the level name before it may carry colour codes). Anchored at the end so that a longer line that
#: merely starts the same way (an error about terminating) still shows.
ACTOR_SHUTDOWN_LINE = r"Manually terminating ClientAppActor\s*$"


class _DropFlowerDeprecation(logging.Filter):
    """Drops Flower's run_simulation deprecation record (args hold the feature's description)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(isinstance(a, str) and a.startswith(FLOWER_DEPRECATION) for a in (record.args or ()))


def _ray_line_deduplicators() -> list[Any]:
    """Ray's two driver-side filters of forwarded worker lines (stdout, stderr); [] without Ray.

    The actor-shutdown notice is logged in the actor's own process, so no filter on this process's
    "flwr" logger sees it; the driver only receives it as text. Every forwarded line passes through
    these ``LogDeduplicator`` objects, whose ``skip_re`` is what Ray's documented
    ``RAY_DEDUP_LOGS_SKIP_REGEX`` variable sets at import (too late to set here: ``ray`` may already
    be imported). Setting it on the objects works whenever Ray was imported or initialised. With
    ``RAY_DEDUP_LOGS=0`` Ray bypasses them and the notice shows, as the user asked for raw logs.
    """
    try:
        from ray._private import ray_logging
    except ImportError:  # no Ray (simulation extra not installed): nothing is forwarded
        return []
    return [d for d in (getattr(ray_logging, "stdout_deduplicator", None),
                        getattr(ray_logging, "stderr_deduplicator", None)) if hasattr(d, "skip_re")]


@contextlib.contextmanager
def _ray_actor_shutdown_hidden() -> Iterator[None]:
    """Within the block, Ray drops forwarded worker lines matching ``ACTOR_SHUTDOWN_LINE``.

    A skip pattern the user set (``RAY_DEDUP_LOGS_SKIP_REGEX``) keeps working alongside ours, and is
    put back on exit."""
    saved = [(d, d.skip_re) for d in _ray_line_deduplicators()]
    for deduplicator, theirs in saved:
        pattern = ACTOR_SHUTDOWN_LINE if theirs is None else f"(?:{theirs.pattern})|(?:{ACTOR_SHUTDOWN_LINE})"
        deduplicator.skip_re = re.compile(pattern)
    try:
        yield
    finally:
        for deduplicator, theirs in saved:
            deduplicator.skip_re = theirs


@contextlib.contextmanager
def known_notices_hidden() -> Iterator[None]:
    """Within the block, hide Flower's run_simulation deprecation, Ray's accelerator FutureWarning and
    the actors' "Manually terminating ClientAppActor" lines."""
    flower = logging.getLogger("flwr")
    drop = _DropFlowerDeprecation()
    flower.addFilter(drop)
    try:
        with warnings.catch_warnings(), _ray_actor_shutdown_hidden():
            warnings.filterwarnings("ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning)
            yield
    finally:
        flower.removeFilter(drop)
