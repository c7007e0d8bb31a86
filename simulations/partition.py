"""Split a pooled manifest into site manifests written beside it (image paths stay inside its folder).

``natural`` uses the data's real site column (a study, cohort or institution); ``iid`` deals rows
out at random, stratified by label/event, and is labelled simulated in reports. Each site keeps
the rows' train/val/test split, so every site has its own test set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedfusion.client.runtime import site_manifest_path
from fedfusion.common.config import Schema

PARTITIONS = ("natural", "iid")


def partition_manifest(manifest_path: Path, schema: Schema, how: str, num_sites: int = 3,
                       seed: int = 0) -> dict[str, Path]:
    """Write ``site-<name>.csv`` files next to ``manifest_path``; return {site name: path}."""
    raw = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    if how == "natural":
        if not schema.site_column or schema.site_column not in raw.columns:
            raise ValueError(f"data set '{schema.name}' has no natural site column; use --partition iid")
        assignment = raw[schema.site_column].to_numpy()
    elif how == "iid":
        assignment = _iid_assignment(raw, schema, num_sites, seed)
    else:
        raise ValueError(f"unknown partition {how!r}; choose one of {PARTITIONS}")
    paths: dict[str, Path] = {}
    for site in sorted(pd.unique(assignment), key=str):
        path = site_manifest_path(manifest_path.parent, str(site))
        raw[assignment == site].to_csv(path, index=False)
        paths[str(site)] = path
    return paths


def _iid_assignment(raw: pd.DataFrame, schema: Schema, num_sites: int, seed: int) -> np.ndarray:
    """Round-robin over a shuffled order within each (split, label/event) stratum."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    target = schema.label_column if schema.has_classification else schema.event_column
    strata = raw.get("split", pd.Series("train", index=raw.index)).astype(str) + "|" + raw[target].astype(str)
    rng = np.random.default_rng(seed)
    out = np.empty(len(raw), dtype=object)
    for _, idx in raw.groupby(strata).indices.items():
        order = rng.permutation(idx)
        offset = int(rng.integers(num_sites))
        for k, row in enumerate(order):
            out[row] = f"site{(k + offset) % num_sites + 1}"
    return out
