"""The seeded, stratified train/val/test split of one site: one algorithm for every place that draws one.

A hospital export rarely carries a ``split`` column. Without one, every message of a federation must
still see the same test rows, and the pooled / local-only baselines must score on those same rows, so
the split is a pure function of (the site's rows, the stratification target, the seed). The shipped
data sets (``simulations/datasets.py``) draw their per-site splits with the same function.

Sizes: 20 % test, then 10 % of the rest val (each at least one case), the rest train; within each
stratum (label, or event for survival) shares follow the largest-remainder rule so every class/event
status is represented in proportion.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TEST_FRACTION = 0.2
VAL_FRACTION = 0.1  # of what remains after the test split
#: The seed a site uses when nothing else names one (``site check`` and a deployed site); documented
#: in docs/schema.md so the split a site checked is the split it trains on.
DEFAULT_SPLIT_SEED = 0
MIN_SPLIT_ROWS = 3


def largest_remainder(total: int, sizes: np.ndarray) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``sizes`` (each capped at its size), summing to total."""
    quota = total * sizes / sizes.sum()
    out = np.minimum(np.floor(quota).astype(int), sizes)
    order = sorted(range(len(sizes)), key=lambda i: (-(quota[i] - np.floor(quota[i])), -sizes[i], i))
    while out.sum() < total:
        for i in order:
            if out.sum() < total and out[i] < sizes[i]:
                out[i] += 1
    return out


def split_rows(rows: pd.Index, strata: pd.Series, rng: np.random.Generator, out: pd.Series) -> None:
    """Write ``test``/``val`` into ``out`` for ``rows`` (one site; the rest stay as they are, ``train``).

    ``rng`` is passed in so a caller splitting several sites draws them from one stream (the shipped
    data sets' splits depend on it). Needs at least :data:`MIN_SPLIT_ROWS` rows (callers check).
    """
    n = len(rows)
    n_test = max(1, int(np.floor(TEST_FRACTION * n + 0.5)))
    n_val = max(1, int(np.floor(VAL_FRACTION * (n - n_test) + 0.5)))
    n_val = min(n_val, n - n_test - 1)
    groups = [rows[(strata.loc[rows] == s).to_numpy()] for s in sorted(strata.loc[rows].unique(), key=str)]
    sizes = np.array([len(g) for g in groups])
    k_test = largest_remainder(n_test, sizes)
    k_val = largest_remainder(n_val, sizes - k_test)
    for g, kt, kv in zip(groups, k_test, k_val, strict=True):
        shuffled = rng.permutation(np.asarray(g))
        out.loc[shuffled[:kt]] = "test"
        out.loc[shuffled[kt : kt + kv]] = "val"


def site_split(strata: pd.Series, seed: int = DEFAULT_SPLIT_SEED) -> pd.Series:
    """The split of one site's rows, stratified on ``strata`` (same index); raises ValueError below 3 rows."""
    if len(strata) < MIN_SPLIT_ROWS:
        raise ValueError(f"{len(strata)} row(s): drawing a train/val/test split needs at least {MIN_SPLIT_ROWS}")
    out = pd.Series("train", index=strata.index, dtype=object)
    split_rows(strata.index, strata.astype(str), np.random.default_rng(seed), out)
    return out
