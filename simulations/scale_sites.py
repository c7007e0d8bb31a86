"""Virtual sites at scale: site ``i``'s rows are drawn on demand from one shared real manifest.

A simulation of 10,000 sites cannot mean 10,000 manifest files and 10,000 cached runtimes. With
``scale-sites = N`` in the run config, partition ``i`` of Flower's simulation runtime is the virtual
site ``v<i>``, whose cases are ``scale-rows-per-site`` rows of the real pooled manifest
``<data-dir>/manifest.csv``, chosen by a draw seeded with ``(seed, i)``. Only the draw is stored
(nowhere: it is recomputed), so a site costs nothing until it is sampled, and its runtime is built
when it is asked to train or evaluate and dropped soon after (``client.runtime`` keeps at most
``scale-cache-size`` of them per process).

What the draw means, plainly:

- **Within** one site the rows are distinct (drawn without replacement), so a site never trains on
  the same case twice and its test rows are never in its own training rows.
- **Across** sites the draw is WITH replacement: 10,000 sites x 50 rows from a few hundred real cases
  reuse every case many times, so two sites share cases and one site's test case can be another
  site's training case. Such a run measures cost (time, memory, Flower/Ray overhead) at scale with
  real data and the real model; its metrics are not an estimate of generalisation across 10,000
  hospitals.
- The per-site split is stratified by the target (label, or event for survival): the test share is
  ``scale-test-fraction`` (at least one row), spread evenly over the sorted strata.

Shared per process: the validated pooled manifest and its decoded images (one tensor per real case,
bounded by the data set's size, not by the number of sites). Nothing per site stays resident.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedfusion.common.config import ConfigError, Schema, load_schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.manifest import Manifest, load_manifest

if TYPE_CHECKING:
    from fedfusion.client.runtime import SiteRuntime

#: Run-config keys of scale mode (defaults live in ``common.federation_config.DEFAULTS``).
SCALE_KEYS = ("scale-sites", "scale-rows-per-site", "scale-test-fraction", "scale-cache-size")
POOLED_MANIFEST = "manifest.csv"


def virtual_site_id(index: int) -> str:
    """The name virtual site ``index`` reports (``v00042``): sortable, and never a real site's name."""
    return f"v{index:05d}"


@dataclass(frozen=True)
class ScaleSiteSource:
    """Where virtual sites come from: the pooled manifest, how many sites, rows and test share."""

    manifest_path: str
    schema_path: str
    num_sites: int
    rows_per_site: int
    test_fraction: float
    seed: int
    cache_size: int = 1

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ScaleSiteSource | None:
        """The source a run config asks for; None when scale mode is off (``scale-sites`` 0 or absent)."""
        try:
            num_sites = int(run_config.get("scale-sites", 0) or 0)
            if num_sites <= 0:
                return None
            rows = int(run_config.get("scale-rows-per-site", 50))
            fraction = float(run_config.get("scale-test-fraction", 0.2))
            cache = int(run_config.get("scale-cache-size", 1))
            seed = int(run_config.get("seed", 0))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"run config: scale-* keys must be numbers ({err})") from None
        missing = [key for key in ("data-dir", "schema") if not run_config.get(key)]
        if missing:
            raise ConfigError(f"run config: scale-sites = {num_sites} needs {missing} (the pooled manifest "
                              f"<data-dir>/{POOLED_MANIFEST} and its schema)")
        if rows < 2:
            raise ConfigError(f"run config: scale-rows-per-site must be >= 2 (a train and a test row), got {rows}")
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"run config: scale-test-fraction must be between 0 and 1 (exclusive), got {fraction}")
        if cache < 1:
            raise ConfigError(f"run config: scale-cache-size must be >= 1, got {cache}")
        return cls(manifest_path=str(Path(str(run_config["data-dir"])) / POOLED_MANIFEST),
                   schema_path=str(run_config["schema"]), num_sites=num_sites, rows_per_site=rows,
                   test_fraction=fraction, seed=seed, cache_size=cache)

    def draw(self, index: int, strata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pooled row positions of site ``index`` and, for each, True where it is a test row.

        Deterministic in (seed, index); ``strata`` holds the pooled rows' target (label or event),
        so that every site's test rows mirror its class mix. ``rows_per_site`` must not exceed the
        pooled rows (rows are distinct within a site).
        """
        if not 0 <= index < self.num_sites:
            raise ConfigError(f"virtual site {index} does not exist: scale-sites = {self.num_sites} "
                              f"(partition ids 0..{self.num_sites - 1})")
        total = len(strata)
        if self.rows_per_site > total:
            raise ConfigError(f"{self.manifest_path}: scale-rows-per-site = {self.rows_per_site} but the pooled "
                              f"manifest has only {total} rows (rows are distinct within a site)")
        rng = np.random.default_rng([self.seed, index])
        rows = rng.choice(total, size=self.rows_per_site, replace=False)
        order = np.lexsort((rng.random(self.rows_per_site), strata[rows]))  # by stratum, random within
        n_test = min(max(1, round(self.rows_per_site * self.test_fraction)), self.rows_per_site - 1)
        picks = np.floor((np.arange(n_test) + 0.5) * self.rows_per_site / n_test).astype(int)
        is_test = np.zeros(self.rows_per_site, dtype=bool)
        is_test[order[picks]] = True
        return rows, is_test


@dataclass
class PooledData:
    """The real data every virtual site draws from, loaded once per process and shared."""

    schema: Schema
    manifest: Manifest
    strata: np.ndarray
    images: dict[tuple[str, int], torch.Tensor]  # (image modality, pooled row) -> tensor; bounded by the data


@lru_cache(maxsize=2)
def pooled_data(manifest_path: str, schema_path: str) -> PooledData:
    """Validate the pooled manifest once per process (its problems name its file, line and column)."""
    schema = load_schema(schema_path)
    manifest = load_manifest(manifest_path, schema, check_images=False)
    frame = manifest.frame
    if schema.has_classification:
        strata = frame["label"].astype(str).to_numpy()
    elif schema.has_survival:
        strata = frame["event"].astype(int).astype(str).to_numpy()
    else:  # pragma: no cover - every schema has a target (config.py enforces it)
        strata = np.zeros(len(frame), dtype=str)
    return PooledData(schema=schema, manifest=manifest, strata=strata, images={})


class SharedImageDataset(MultimodalDataset):
    """A site's split whose images come from the process-wide cache of the pooled rows' tensors.

    ``source_rows[i]`` is the pooled row of the site manifest's row ``i``: a case drawn by many
    virtual sites is decoded once per process, not once per site and round.
    """

    def __init__(self, manifest: Manifest, preprocessor: Preprocessor, split: str, *, source_rows: np.ndarray,
                 shared: dict[tuple[str, int], torch.Tensor], train_augment: bool = False):
        super().__init__(manifest, preprocessor, split, train_augment=train_augment, cache_images=False)
        self.source_rows = source_rows
        self.shared = shared

    def _image(self, index: int, modality: str = "image") -> torch.Tensor:
        key = (modality, int(self.source_rows[int(self.rows[index])]))
        tensor = self.shared.get(key)
        if tensor is None:
            tensor = super()._image(index, modality)
            self.shared[key] = tensor
        return tensor


def build_virtual_site(source: ScaleSiteSource, index: int, device: str = "auto") -> SiteRuntime:
    """Site ``index``'s runtime: its drawn rows, its own standardisation, train and test datasets."""
    from fedfusion.client.runtime import SiteRuntime
    from fedfusion.common.training import pick_device

    pooled = pooled_data(source.manifest_path, source.schema_path)
    rows, is_test = source.draw(index, pooled.strata)
    frame = pooled.manifest.frame.iloc[rows].reset_index(drop=True)
    frame["split"] = np.where(is_test, "test", "train")
    manifest = Manifest(path=pooled.manifest.path, schema=pooled.schema, frame=frame, has_split_column=True)
    pre = Preprocessor.fit(manifest)
    train_set = SharedImageDataset(manifest, pre, "train", source_rows=rows, shared=pooled.images, train_augment=True)
    test_set = SharedImageDataset(manifest, pre, "test", source_rows=rows, shared=pooled.images)
    present = manifest.modality_present().iloc[manifest.rows("train")]
    counts = {m: int(present[m].sum()) for m in pooled.schema.modalities}
    return SiteRuntime(site_id=virtual_site_id(index), schema=pooled.schema, manifest=manifest,
                       device=pick_device(device), preprocessor=pre, train_set=train_set, test_set=test_set,
                       modality_counts=counts, reuse_model=True)


class BoundedRuntimeCache:
    """At most ``size`` site runtimes, least recently used dropped first.

    With 10,000 virtual sites a process may serve hundreds of distinct sites in a run; an unbounded
    cache would keep every one of them (datasets, standardisation) resident.
    """

    def __init__(self, size: int = 1):
        self.size = size
        self._items: OrderedDict[tuple[Any, ...], SiteRuntime] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[Any, ...], build: Any, size: int | None = None) -> SiteRuntime:
        """The cached runtime for ``key``, else ``build()``; trims to ``size`` (this run's bound)."""
        if size is not None:
            self.size = max(1, int(size))
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        runtime = build()
        self._items[key] = runtime
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return runtime

    def clear(self) -> None:
        self._items.clear()


def expected_draw_overlap(pooled_rows: int, rows_per_site: int, num_sites: int) -> float:
    """Mean number of virtual sites that hold any one pooled case (for the docs: reuse at scale)."""
    if pooled_rows <= 0:
        raise ValueError(f"the pooled manifest has {pooled_rows} rows; expected at least one")
    return num_sites * rows_per_site / pooled_rows
