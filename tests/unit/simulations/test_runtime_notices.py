"""Flower's run_simulation deprecation and Ray's accelerator FutureWarning are hidden; nothing else is."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator

import pytest
from flwr.supercore.logger import warn_deprecated_feature

from fedfusion.simulations.runtime_notices import FLOWER_DEPRECATION, known_notices_hidden

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
