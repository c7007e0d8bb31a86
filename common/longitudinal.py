"""Longitudinal (long-format) manifests: several rows per case, one per visit -> one case row + visit arrays.

A schema with a ``visits`` section (:class:`fedfusion.common.config.VisitSpec`) makes the manifest
long: every row is one visit of a case and carries the visit's time (``visits.time_column``) and the
per-visit values (``visits.columns``); every other column (split, site, label/time/event, image,
clinical, omics) is case-level and must be identical on all rows of a case. ::

    case_id,split,time,event,age,visit_time,grad,ef
    p1,train,4.9,0,75.1,0.00,10,93
    p1,train,4.9,0,75.1,0.01,,93      <- missing value: empty
    p2,test,9.7,1,45.8,0.00,14,68
    p3,train,2.0,0,61.4,,,            <- no visit time: a case without visits (modality absent)

:func:`collapse_visits` turns that into what the rest of the code knows: one row per case (the first
row of the case, so every case-level check of :mod:`fedfusion.common.manifest` runs unchanged and
names that row's line) plus, per case, the visit times sorted ascending and a (visits, columns) value
array with NaN for missing values. Only the LAST ``max_visits`` visits are kept: the most recent
measurements are the ones a clinician acts on, and a fixed cap bounds the tensor every site builds.

:func:`visit_tensors` gives the data loader's ``visits*`` tensors (see
:mod:`fedfusion.common.models.encoders.temporal` for their contract): values standardised with the
site's own training statistics (:func:`fit_visit_stats`), times divided by one time scale so gaps and
times keep their ratios.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from fedfusion.common.config import Schema

#: Frame columns of a loaded long-format manifest: per case, sorted times (k,) and values (k, F).
VISIT_TIMES = "visit_times"
VISIT_VALUES = "visit_values"
_BLANKS = ("", "na", "nan", "null", "none")

#: (message, CSV line or None, case or None, column or None) -> records one problem.
Report = Callable[[str, "int | None", "str | None", "str | None"], None]


@dataclass
class LongFormat:
    """A long manifest collapsed to cases. ``cases`` holds each case's first row (raw strings, index
    0..n-1, file order), ``lines`` its CSV line; ``times``/``values`` the kept visits per case."""

    cases: pd.DataFrame
    lines: list[int]
    times: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    dropped: int = 0  # visits beyond max_visits (oldest first) that were not kept


def _blank(text: pd.Series) -> pd.Series:
    return text.str.strip().str.lower().isin(_BLANKS)


def collapse_visits(raw: pd.DataFrame, schema: Schema, report: Report) -> LongFormat | None:
    """Collapse a long manifest (raw strings, header stripped) to one row per case; report every problem.

    Returns None when the visit columns are missing (nothing else can be checked). Line numbers are
    the editor's: header = line 1.
    """
    spec = schema.visits
    assert spec is not None
    needed = [spec.time_column, *spec.columns]
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        report(f"missing visit column(s) {missing}; the schema '{schema.name}' is longitudinal (long format: one "
               f"row per visit with '{spec.time_column}' and the per-visit columns {list(spec.columns)})",
               None, None, None)
        return None
    ids = raw["case_id"].str.strip() if "case_id" in raw.columns else pd.Series("", index=raw.index)
    # rows without a case_id stay separate so the case-level check reports each at its own line
    key = ids.where(ids != "", "\0row" + pd.Series(raw.index.astype(str), index=raw.index))
    groups = key.groupby(key, sort=False).indices  # case -> row positions, in file order
    _check_case_level(raw, ids, key, groups, [c for c in raw.columns if c not in needed], needed, report)

    first = [rows[0] for rows in groups.values()]
    out = LongFormat(cases=raw.iloc[first].reset_index(drop=True), lines=[int(r) + 2 for r in first])
    times, values = _parse_visits(raw, ids, spec.time_column, list(spec.columns), report)
    keep = spec.max_visits
    for rows in groups.values():
        rows = [r for r in rows if not np.isnan(times[r])]
        seen: dict[float, int] = {}
        for r in rows:
            if times[r] in seen:
                report(f"two visits at {spec.time_column} {raw[spec.time_column].iloc[r].strip()!r} (lines "
                       f"{seen[times[r]] + 2} and {r + 2}); expected one row per visit time",
                       r + 2, ids.iloc[r], spec.time_column)
            seen.setdefault(times[r], r)
        rows = sorted(rows, key=lambda r: times[r])
        out.dropped += max(0, len(rows) - keep)
        rows = rows[-keep:] if keep else rows
        out.times.append(times[rows].astype(np.float64))
        out.values.append(values[rows].reshape(len(rows), len(spec.columns)))
    return out


def _check_case_level(raw: pd.DataFrame, ids: pd.Series, key: pd.Series, groups: dict, columns: list[str],
                      visit_columns: list[str], report: Report) -> None:
    """Every case-level column must hold one value per case (blank spellings count as one value)."""
    if all(len(rows) == 1 for rows in groups.values()):
        return
    for column in columns:
        text = raw[column].str.strip()
        text = text.where(~_blank(text), "")
        varies = text.groupby(key, sort=False).nunique()
        for case in varies.index[varies > 1]:
            rows = groups[case]
            values = text.iloc[rows].to_numpy()
            other = int(rows[int(np.argmax(values != values[0]))])
            report(f"case-level value differs between the rows of this case: line {rows[0] + 2} has "
                   f"{values[0]!r}, line {other + 2} has {text.iloc[other]!r}; expected the same value "
                   f"on every visit row of a case (only {visit_columns} may change between visits)",
                   other + 2, ids.iloc[other], column)


def _parse_visits(raw: pd.DataFrame, ids: pd.Series, time_column: str, columns: list[str], report: Report
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Visit time per row (NaN = the row holds no visit) and per-visit values (NaN = missing)."""
    def numbers(column: str, expected: str) -> tuple[np.ndarray, np.ndarray]:
        text = raw[column]
        blank = _blank(text).to_numpy()
        parsed = pd.to_numeric(text.where(~blank), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~blank & ~np.isfinite(parsed)
        for r in np.flatnonzero(bad):
            report(f"value {text.iloc[r]!r} is not a finite number; expected {expected}", int(r) + 2,
                   ids.iloc[r], column)
        return np.where(bad, np.nan, parsed), blank

    values = np.full((len(raw), len(columns)), np.nan)
    any_value = np.zeros(len(raw), dtype=bool)
    for j, column in enumerate(columns):
        values[:, j], blank = numbers(column, "a number (per-visit value), or empty for missing")
        any_value |= ~blank
    times, blank_time = numbers(time_column, "the visit time (a number in the time unit of the survival time)")
    for r in np.flatnonzero(blank_time & any_value):
        report(f"per-visit values but no {time_column!r}; expected the visit time (leave every visit column "
               "empty for a case without visits)", int(r) + 2, ids.iloc[r], time_column)
    return times, values


def visits_present(frame: pd.DataFrame) -> pd.Series:
    """Per case: has at least one visit (the ``visits`` modality is present)."""
    return frame[VISIT_TIMES].map(len) > 0


def fit_visit_stats(frame: pd.DataFrame, rows: np.ndarray, num_columns: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std) per visit column over every visit of ``rows`` and the time scale (std of their visit
    times; 1 when undefined). All-missing or constant columns get mean 0 / std 1."""
    times = [frame[VISIT_TIMES].iloc[r] for r in rows]
    blocks = [frame[VISIT_VALUES].iloc[r] for r in rows]
    stacked = np.concatenate(blocks, axis=0) if blocks else np.zeros((0, num_columns))
    stacked = stacked.reshape(-1, num_columns)
    mean, std = np.zeros(num_columns), np.ones(num_columns)
    for j in range(num_columns):
        column = stacked[:, j][np.isfinite(stacked[:, j])]
        if len(column):
            mean[j] = column.mean()
            std[j] = column.std() if column.std() > 1e-8 else 1.0
    all_times = np.concatenate(times) if times else np.zeros(0)
    scale = float(all_times.std()) if len(all_times) > 1 and all_times.std() > 1e-8 else 1.0
    return mean, std, np.array([scale])


def visit_tensors(frame: pd.DataFrame, rows: np.ndarray, max_visits: int, mean: np.ndarray, std: np.ndarray,
                  time_scale: float) -> dict[str, torch.Tensor]:
    """The ``visits``/``visits_time``/``visits_gap``/``visits_mask`` tensors of ``rows``, right-padded to
    ``max_visits`` slots (real visits first, in time order)."""
    n, width = len(rows), len(mean)
    values = np.zeros((n, max_visits, 2 * width), dtype=np.float32)
    times = np.zeros((n, max_visits), dtype=np.float32)
    gaps = np.zeros((n, max_visits), dtype=np.float32)
    mask = np.zeros((n, max_visits), dtype=bool)
    for i, row in enumerate(rows):
        t = frame[VISIT_TIMES].iloc[row][-max_visits:]
        v = frame[VISIT_VALUES].iloc[row][-max_visits:]
        k = len(t)
        if k == 0:
            continue
        missing = ~np.isfinite(v)
        values[i, :k, 0::2] = np.where(missing, 0.0, (v - mean) / std)
        values[i, :k, 1::2] = missing
        times[i, :k] = t / time_scale
        gaps[i, 1:k] = np.diff(t) / time_scale
        mask[i, :k] = True
    return {"visits": torch.from_numpy(values), "visits_time": torch.from_numpy(times),
            "visits_gap": torch.from_numpy(gaps), "visits_mask": torch.from_numpy(mask)}


def case_rows(raw: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """For code that works per case on a raw long manifest (partitioning): the first row of each case
    (index 0..n-1) and, for every raw row, the position of its case in that frame."""
    ids = raw["case_id"].str.strip()
    codes, uniques = pd.factorize(ids, sort=False)
    first = pd.Series(np.arange(len(raw))).groupby(codes).min().to_numpy()
    return raw.iloc[first].reset_index(drop=True), codes


def to_long_format(cases: pd.DataFrame, visits: pd.DataFrame, time_column: str) -> pd.DataFrame:
    """Write-side inverse of :func:`collapse_visits`: one row per visit (case-level columns repeated),
    one row with empty visit columns for a case without visits; cases keep their order."""
    order = pd.Series(np.arange(len(cases)), index=cases["case_id"])
    long = cases.merge(visits, on="case_id", how="left", sort=False)
    long["_case"] = long["case_id"].map(order)
    long = long.sort_values(["_case", time_column], kind="stable", na_position="first")
    return long.drop(columns="_case").reset_index(drop=True)
