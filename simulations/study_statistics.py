"""Honest statistics for a study report (:mod:`fedfusion.simulations.study_report`).

A study's headline number is FLamby's: per seed the mean over sites of each site's test metric,
then mean ± sd over seeds. The sd says how much the number moves between seeds; it says nothing
about how few patients a site tested on. This module adds what a reader needs to judge a difference:

- **test counts** per site: cases, and events (survival) or positives (binary classification);
- **bootstrap 95 % intervals** per site and for the mean over sites, from the stored per-case test
  predictions: each (seed, site) test split is resampled on its own (stratified by site and seed),
  with :func:`fedfusion.common.metrics.bootstrap_interval` -- the project's one bootstrap -- drawing
  the rows. A site's resample is drawn with a seed fixed by the site's name, so every method (and
  every seed, when the test split is the same) sees the same resampled patients: intervals of two
  methods are comparable. The interval covers test-case sampling only; seed-to-seed spread is the sd;
- **paired differences over seeds** (method − reference, per seed): mean, a t 95 % interval over
  seeds and a sign count ("better in 4/5 seeds"), because seeds share data splits and initial
  weights, so paired differences are far less noisy than two means ± sd side by side.

A method whose record holds no per-case predictions (site-reported federated subset arms, tabular
baselines, test-time ablations) gets no interval: tables say so rather than inventing one.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import rankdata
from scipy.stats import t as student_t

from fedfusion.common.metrics import bootstrap_interval, concordance_index

if TYPE_CHECKING:
    from fedfusion.common.training import Predictions

RESAMPLES = 1000
LEVEL = 0.95
#: What a table cell says for a method whose record has no per-case test predictions.
NOT_RECORDED = "no per-case predictions recorded"

Interval = tuple[float, float, float]  # (estimate, low, high)
_NAN_INTERVAL: Interval = (math.nan, math.nan, math.nan)


# ----------------------------------------------------------------------------------- counts


def case_counts(pred: Predictions) -> dict[str, Any]:
    """Test cases of one scored split: ``events`` (survival), ``positives`` (binary labels, class 1)
    or ``class_counts`` ("12/30/8", more classes). Stored in each results row, so a reader sees how
    many events a C-index or positives an AUC rests on."""
    out: dict[str, Any] = {}
    if pred.event is not None:
        out["events"] = float(np.sum(np.asarray(pred.event) == 1))
    if pred.labels is not None:
        labels = np.asarray(pred.labels).astype(int)
        classes = pred.probs.shape[1] if pred.probs is not None and pred.probs.ndim == 2 else 2
        if classes <= 2:
            out["positives"] = float(np.sum(labels == 1))
        else:
            out["class_counts"] = "/".join(str(int(np.sum(labels == c))) for c in range(classes))
    return out


def site_counts(rows: Sequence[Mapping[str, Any]], families: Iterable[str] = ("baseline", "federated")
                ) -> list[dict[str, Any]]:
    """One row per site: test cases and events/positives, from the results rows of methods scored on the
    whole test split (``families``). A value that differs between seeds (the seed draws the split) is
    shown as ``min–max``."""
    wanted = set(families)
    keys = ("n_test", "events", "positives", "class_counts")
    per_site: dict[str, dict[str, dict[int, Any]]] = {}
    for r in rows:
        if r.get("family") not in wanted:
            continue
        cell = per_site.setdefault(str(r["site"]), {})
        for key in keys:
            value = r.get(key)
            if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
                continue
            cell.setdefault(key, {}).setdefault(int(r["seed"]), value)
    out = []
    for site in sorted(per_site):
        row: dict[str, Any] = {"site": site}
        for key in keys:
            values = per_site[site].get(key)
            if values:
                row[{"n_test": "test n"}.get(key, key.replace("_", " "))] = _span(list(values.values()))
        row["seeds"] = len({s for v in per_site[site].values() for s in v})
        out.append(row)
    return out


def _span(values: list[Any]) -> str:
    if isinstance(values[0], str):
        return values[0] if len(set(values)) == 1 else "; ".join(dict.fromkeys(values))
    numbers = [int(round(float(v))) for v in values]
    low, high = min(numbers), max(numbers)
    return str(low) if low == high else f"{low}–{high}"


# ----------------------------------------------------------------------------------- bootstrap


def _rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC AUC as the Mann-Whitney statistic (ties count half): the value of
    :func:`fedfusion.common.metrics.auc`, ~50x faster, which 1000 resamples x sites x seeds need."""
    positive = labels.astype(bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def case_score(metric: str, pred: Predictions, rows: np.ndarray | None = None) -> float:
    """``metric`` (``auc`` or ``c_index``) of ``pred`` restricted to ``rows`` (all rows for None);
    NaN when the rows cannot be scored (one class, no comparable pair) or the inputs are missing.
    AUC follows :func:`fedfusion.common.metrics.auc`: binary on the class-1 column, more classes the
    one-vs-rest mean over the classes present."""
    if metric == "auc" and pred.probs is not None and pred.labels is not None:
        probs, labels = np.asarray(pred.probs), np.asarray(pred.labels).astype(int)
        if rows is not None:
            probs, labels = probs[rows], labels[rows]
        if probs.ndim == 1 or probs.shape[1] == 2:
            score = probs if probs.ndim == 1 else probs[:, 1]
            return _rank_auc(labels == 1, score) if len(np.unique(labels)) == 2 else math.nan
        present = np.unique(labels)
        if len(present) < 2:
            return math.nan
        return float(np.mean([_rank_auc(labels == c, probs[:, c]) for c in present]))
    if metric == "c_index" and pred.risk is not None and pred.time is not None and pred.event is not None:
        time, event, risk = np.asarray(pred.time), np.asarray(pred.event), np.asarray(pred.risk)
        if rows is not None:
            time, event, risk = time[rows], event[rows], risk[rows]
        return concordance_index(time, event, risk)
    return math.nan


def _length(pred: Predictions) -> int:
    for value in (pred.labels, pred.risk):
        if value is not None:
            return len(value)
    return 0


def _site_seed(site: str, seed: int) -> int:
    """A resampling seed fixed by the site's name: every method gets the same resampled patients."""
    return seed + zlib.crc32(site.encode())


def _resampled(metric: str, pred: Predictions, site: str, resamples: int, seed: int) -> np.ndarray:
    """The metric on each of ``resamples`` bootstrap resamples of one test split (NaN: unscorable)."""
    values: list[float] = []

    def statistic(rows: np.ndarray) -> float:
        value = case_score(metric, pred, rows)
        values.append(value)
        return value

    bootstrap_interval(statistic, _length(pred), resamples=resamples, seed=_site_seed(site, seed))
    out = np.full(resamples, math.nan)
    out[:len(values)] = values
    return out


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the finite resamples; NaN when fewer than half are finite (the rule of
    :func:`~fedfusion.common.metrics.bootstrap_interval`)."""
    finite = values[np.isfinite(values)]
    if len(finite) < max(len(values) // 2, 1):
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` skipping NaN; NaN where every value is NaN (no warning)."""
    finite = np.isfinite(values)
    count = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), math.nan)


def bootstrap_intervals(predictions: Sequence[tuple[int, str, Predictions]], metric: str, *,
                        resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
                        ) -> dict[str, Any]:
    """Percentile bootstrap intervals of one method, from its per-case test predictions.

    ``predictions`` holds one ``(seed, site, Predictions)`` per scored test split. Returns
    ``{"sites": {site: (estimate, low, high)}, "mean": (estimate, low, high)}`` where a site's
    estimate is its mean over seeds and ``mean`` is FLamby's number (per seed the mean over sites,
    then the mean over seeds): each resample recomputes exactly that from resampled test cases.
    """
    seeds = sorted({s for s, _, _ in predictions})
    sites = sorted({site for _, site, _ in predictions})
    if not seeds:
        return {"sites": {}, "mean": _NAN_INTERVAL}
    point = np.full((len(seeds), len(sites)), math.nan)
    draws = np.full((len(seeds), len(sites), resamples), math.nan)
    for s, site, pred in predictions:
        i, j = seeds.index(s), sites.index(site)
        point[i, j] = case_score(metric, pred)
        draws[i, j] = _resampled(metric, pred, site, resamples, seed)
    out: dict[str, Any] = {"sites": {}}
    for j, site in enumerate(sites):
        estimate = float(_nanmean(point[:, j], axis=0))
        out["sites"][site] = (estimate, *_percentiles(_nanmean(draws[:, j, :], axis=0), level))
    mean_point = float(_nanmean(_nanmean(point, axis=1), axis=0))
    mean_draws = _nanmean(_nanmean(draws, axis=1), axis=0)  # per resample: sites, then seeds
    out["mean"] = (mean_point, *_percentiles(mean_draws, level))
    return out


def format_interval(interval: Interval, digits: int = 3) -> str:
    """``0.712 [0.651, 0.770]``; ``n/a`` without an estimate, the estimate alone without bounds."""
    estimate, low, high = interval
    if math.isnan(estimate):
        return "n/a"
    if math.isnan(low) or math.isnan(high):
        return f"{estimate:.{digits}f} [interval n/a]"
    return f"{estimate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def interval_table(methods: Sequence[str], intervals: Mapping[str, dict[str, Any] | None], sites: Sequence[str],
                   metric: str) -> list[dict[str, Any]]:
    """Report rows: per method the mean over sites and each site as ``estimate [low, high]``; a method
    without stored predictions (``intervals[m]`` None) says so in every cell."""
    table = []
    for method in methods:
        found = intervals.get(method)
        row: dict[str, Any] = {"method": method}
        if found is None:
            row[f"{metric}, mean over sites [95 % CI]"] = NOT_RECORDED
            row.update({site: "" for site in sites})
        else:
            row[f"{metric}, mean over sites [95 % CI]"] = format_interval(found["mean"])
            row.update({site: format_interval(found["sites"][site]) if site in found["sites"] else ""
                        for site in sites})
        table.append(row)
    return table


# ----------------------------------------------------------------------------------- paired by seed


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float],
                      level: float = LEVEL) -> dict[str, Any]:
    """``values − reference`` paired by seed (seeds where both are finite): mean, Student-t interval
    over seeds (NaN bounds with one seed), the number of seeds where the method is better (Δ > 0;
    every metric here is higher-is-better) and the per-seed differences."""
    seeds = [s for s in values if s in reference and math.isfinite(values[s]) and math.isfinite(reference[s])]
    delta = np.array([values[s] - reference[s] for s in seeds], dtype=float)
    n = len(delta)
    out: dict[str, Any] = {"n_seeds": n, "better": int(np.sum(delta > 0)), "worse": int(np.sum(delta < 0)),
                           "per_seed": {int(s): float(d) for s, d in zip(seeds, delta, strict=True)}}
    if n == 0:
        return {**out, "mean": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    mean = float(delta.mean())
    if n < 2:
        return {**out, "mean": mean, "ci_low": math.nan, "ci_high": math.nan}
    half = float(student_t.ppf(0.5 + level / 2, n - 1) * delta.std(ddof=1) / math.sqrt(n))
    return {**out, "mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def sign_text(diff: Mapping[str, Any]) -> str:
    """"better in 4/5 seeds" (ties are neither better nor worse)."""
    return f"better in {diff['better']}/{diff['n_seeds']} seeds" if diff["n_seeds"] else "n/a"


def paired_cell(diff: Mapping[str, Any], digits: int = 3) -> str:
    """``+0.021 [−0.004, +0.046]``: the mean paired difference and its interval over seeds."""
    if math.isnan(diff["mean"]):
        return "n/a"
    if math.isnan(diff["ci_low"]):
        return f"{diff['mean']:+.{digits}f} [one seed: no interval]"
    return f"{diff['mean']:+.{digits}f} [{diff['ci_low']:+.{digits}f}, {diff['ci_high']:+.{digits}f}]"


def per_site_seed_values(rows: Sequence[Mapping[str, Any]], method: str, metric: str
                         ) -> dict[str, dict[int, float]]:
    """{site: {seed: metric}} of one method."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["method"] == method:
            out.setdefault(str(r["site"]), {})[int(r["seed"])] = float(r.get(metric, math.nan))
    return out


def paired_rows(methods: Sequence[str], references: Sequence[tuple[str, str]],
                per_seed: Callable[[str], Mapping[int, float]]) -> list[dict[str, Any]]:
    """One row per (method, reference): the paired difference of FLamby's per-seed numbers (mean over
    sites), ``per_seed(name)`` giving {seed: value}. ``references`` pairs a method name with the label
    the table shows (e.g. ``("best local-only", "best local-only (optimistic: chosen on test)")``);
    a reference the study lacks is skipped. Numbers stay numbers here; :func:`paired_report_rows`
    formats them."""
    out = []
    for method in methods:
        values = per_seed(method)
        for reference, label in references:
            other = per_seed(reference)
            if not other or reference == method:
                continue
            diff = paired_difference(values, other)
            out.append({"method": method, "reference": reference, "label": label, "mean_diff": diff["mean"],
                        "ci_low": diff["ci_low"], "ci_high": diff["ci_high"], "n_seeds": diff["n_seeds"],
                        "better": diff["better"], "worse": diff["worse"],
                        "per_seed": ";".join(f"{s}:{d:+.4f}" for s, d in diff["per_seed"].items())})
    return out


def paired_by_site(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], metric: str,
                   reference: str = "local-only") -> list[dict[str, Any]]:
    """Per method and site: method − that site's own ``reference`` model on the site's test split,
    paired by seed. Answers the hospital's question: would joining have beaten training alone *here*?"""
    ref = per_site_seed_values(rows, reference, metric)
    if not ref:
        return []
    out = []
    for method in methods:
        for site, values in sorted(per_site_seed_values(rows, method, metric).items()):
            diff = paired_difference(values, ref.get(site, {}))
            out.append({"method": method, "site": site, "reference": reference, "mean_diff": diff["mean"],
                        "ci_low": diff["ci_low"], "ci_high": diff["ci_high"], "n_seeds": diff["n_seeds"],
                        "better": diff["better"], "worse": diff["worse"]})
    return out


def paired_report_rows(paired: Sequence[Mapping[str, Any]], key: str = "label") -> list[dict[str, Any]]:
    """:func:`paired_rows` / :func:`paired_by_site` output as report cells."""
    table = []
    for p in paired:
        diff = {"mean": p["mean_diff"], "ci_low": p["ci_low"], "ci_high": p["ci_high"], "better": p["better"],
                "n_seeds": p["n_seeds"]}
        table.append({"method": p["method"], ("vs" if key == "label" else "site"): p[key],
                      "Δ (mean over seeds) [95 % CI, t over seeds]": paired_cell(diff), "seeds": sign_text(diff)})
    return table
