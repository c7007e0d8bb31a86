"""Hide the two notices Flower's simulation runtime prints that a researcher can do nothing about.

- Flower 1.41 logs ``DEPRECATED FEATURE: The `run_simulation` function is deprecated ...`` on
  every call. ``flwr run`` would need a SuperLink process per study; the in-process runtime is
  the right tool for ``fedfusion simulate``/``experiment`` until Flower removes it (then this
  module goes, and the tests here say so).
- Ray 2.55 warns ``FutureWarning: Tip: In future versions of Ray, Ray will no longer override
  accelerator visible devices ...`` at ``ray.init``. Setting the variable it names would change
  which GPUs a 0-GPU site sees, so the notice is hidden instead of acted on.

Both are filtered by their exact text and only while the runtime runs: every other warning and
every other Flower log line still reaches the user.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

#: Start of the message Flower passes to ``warn_deprecated_feature`` in ``flwr.simulation.run_simulation``.
FLOWER_DEPRECATION = "The `run_simulation` function is deprecated"
#: Start of Ray's FutureWarning in ``ray._private.worker.init`` (a regular expression for ``filterwarnings``).
RAY_ACCELERATOR_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator"


class _DropFlowerDeprecation(logging.Filter):
    """Drops Flower's run_simulation deprecation record (args hold the feature's description)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(isinstance(a, str) and a.startswith(FLOWER_DEPRECATION) for a in (record.args or ()))


@contextlib.contextmanager
def known_notices_hidden() -> Iterator[None]:
    """Within the block, hide Flower's run_simulation deprecation and Ray's accelerator FutureWarning."""
    flower = logging.getLogger("flwr")
    drop = _DropFlowerDeprecation()
    flower.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning)
            yield
    finally:
        flower.removeFilter(drop)
