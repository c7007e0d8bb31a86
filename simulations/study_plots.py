"""PNG figures of a study report (:mod:`fedfusion.simulations.study_report`), drawn headless (Agg).

Curves (ROC, calibration, Kaplan-Meier) pool every seed's and site's test predictions of a method,
so they show the method's overall behaviour, not one run. Kaplan-Meier risk groups are the halves
of each (seed, site) test split above and below that split's median predicted risk: risk scores of
different models and sites are not on one scale, their ranks within a site are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedfusion.common.plots import chance_level  # noqa: E402

if TYPE_CHECKING:
    from fedfusion.common.training import Predictions


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd (ddof=1) of the finite values; sd is NaN with fewer than two."""
    finite = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _chance(ax: plt.Axes, metric: str) -> None:
    """The 0.5 line of an AUC / C-index: what a model that ranks at random scores."""
    level = chance_level(metric)
    if level is not None:
        ax.axhline(level, linestyle="--", color="black", linewidth=0.8, alpha=0.6, label=f"chance ({level:g})")


def plot_rounds(rounds: list[dict[str, Any]], summary: dict[str, dict[str, Any]], metric: str,
                path: Path) -> Path | None:
    """Site-mean metric per round of each federated method (mean over seeds, band = +/- sd);
    dashed lines are the baselines' means."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rounds) if summary.get(m, {}).get("family") == "federated"]
    if not methods:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in methods:
        by_round: dict[int, list[float]] = {}
        for r in rounds:
            if r["method"] == method:
                by_round.setdefault(int(r["round"]), []).append(float(r.get(metric, math.nan)))
        xs = sorted(by_round)
        stats = [mean_sd(by_round[x]) for x in xs]
        mean = np.array([s[0] for s in stats])
        sd = np.nan_to_num(np.array([s[1] for s in stats]))
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=method)
        ax.fill_between(xs, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    for name, style in (("pooled", "--"), ("local-only", ":"), ("best local-only", "-."),
                        ("best local-only (val-chosen)", (0, (1, 3)))):
        value = summary.get(name, {}).get(f"{metric}_mean", math.nan)
        if not math.isnan(value):
            ax.axhline(value, linestyle=style, color="grey", linewidth=1, label=name)
    _chance(ax, metric)
    ax.set(xlabel="round", ylabel=f"{metric} (mean over sites)", title=f"{metric} per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sites(by_site: list[dict[str, Any]], methods: list[str], metric: str, path: Path,
               intervals: dict[tuple[str, str], tuple[float, float]] | None = None) -> Path | None:
    """Grouped bars: each site's metric per method (mean over seeds). Error bars: the 95 % bootstrap
    interval over test cases where ``intervals`` gives one for (method, site) -- how far a site's
    number could move with other patients -- else sd over seeds; a bar with neither has none."""
    sites = sorted({r["site"] for r in by_site if r["method"] in methods})
    if not sites or not methods:
        return None
    lookup = {(r["method"], r["site"]): r for r in by_site}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(sites) * max(1, len(methods)) * 0.35 + 2), 4))
    for i, method in enumerate(methods):
        cells = [lookup.get((method, s), {}) for s in sites]
        means = np.array([c.get(f"{metric}_mean", math.nan) for c in cells], dtype=float)
        if intervals is None:
            yerr = np.nan_to_num([c.get(f"{metric}_sd", math.nan) for c in cells])
        else:
            bounds = np.array([intervals.get((method, s), (math.nan, math.nan)) for s in sites], dtype=float)
            # clipped at 0: the interval is around the predictions' estimate, the bar is the reported mean
            yerr = np.nan_to_num(np.clip([means - bounds[:, 0], bounds[:, 1] - means], 0, None))
        ax.bar(np.arange(len(sites)) + (i - (len(methods) - 1) / 2) * width, means, width, yerr=yerr, capsize=2,
               label=method)
    ax.set_xticks(np.arange(len(sites)), sites, rotation=30)
    _chance(ax, metric)
    bars = "95 % bootstrap CI over test cases" if intervals is not None else "sd over seeds"
    ax.set(ylabel=metric, title=f"{metric} per site (test split; error bars: {bars})")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_vs_local(by_site: list[dict[str, Any]], methods: list[str], metric: str, path: Path,
                  reference: str = "local-only") -> Path | None:
    """One point per (method, site): x = the site's own ``reference`` (local-only) model, y = the
    method on that site (both mean over seeds). Points above the diagonal are sites that gained by
    joining; the plot shows who gains, which a mean over sites hides."""
    lookup = {(r["method"], str(r["site"])): r.get(f"{metric}_mean", math.nan) for r in by_site}
    sites = sorted({str(r["site"]) for r in by_site if r["method"] == reference})
    points = {m: [(lookup[(reference, s)], lookup[(m, s)], s) for s in sites if (m, s) in lookup
                  and math.isfinite(lookup[(reference, s)]) and math.isfinite(lookup[(m, s)])] for m in methods}
    points = {m: p for m, p in points.items() if p}
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    values = [v for p in points.values() for x, y, _ in p for v in (x, y)]
    low, high = min(values), max(values)
    pad = 0.05 * max(high - low, 0.05)
    for method, pts in points.items():
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], label=method, s=28)
        for x, y, site in pts:
            ax.annotate(site, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "--", color="grey", linewidth=0.8, label="no change")
    ax.set(xlim=(low - pad, high + pad), ylim=(low - pad, high + pad),
           xlabel=f"{reference} {metric} (site's own model)", ylabel=f"method {metric} on that site",
           title=f"per site: method vs {reference} (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _pooled(preds: list[tuple[int, str, Predictions]], attr: str) -> np.ndarray:
    return np.concatenate([getattr(p, attr) for _, _, p in preds if getattr(p, attr) is not None])


def plot_roc(predictions: dict[str, list[tuple[int, str, Predictions]]], methods: list[str], path: Path) -> Path | None:
    """ROC of each method over all seeds' and sites' test predictions (binary: positive class;
    more classes: micro-average over one-vs-rest)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    drawn = 0
    for method in methods:
        preds = [x for x in predictions.get(method, []) if x[2].probs is not None]
        if not preds:
            continue
        probs, labels = _pooled(preds, "probs"), _pooled(preds, "labels")
        target = np.eye(probs.shape[1])[labels]
        y, score = (target[:, 1], probs[:, 1]) if probs.shape[1] == 2 else (target.ravel(), probs.ravel())
        if y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, label=f"{method} (pooled AUC {roc_auc_score(y, score):.3f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test splits of all sites and seeds")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_calibration(predictions: dict[str, list[tuple[int, str, Predictions]]], methods: list[str], path: Path,
                     bins: int = 10) -> Path | None:
    """Reliability diagram: mean predicted probability vs observed frequency per equal-width bin
    (binary: positive class; more classes: top-label confidence vs accuracy)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    drawn = 0
    for method in methods:
        preds = [x for x in predictions.get(method, []) if x[2].probs is not None]
        if not preds:
            continue
        probs, labels = _pooled(preds, "probs"), _pooled(preds, "labels")
        if probs.shape[1] == 2:
            conf, hit = probs[:, 1], (labels == 1).astype(float)
        else:
            conf, hit = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)
        which = np.minimum((conf * bins).astype(int), bins - 1)
        xs, ys = [], []
        for b in range(bins):
            if (which == b).any():
                xs.append(conf[which == b].mean())
                ys.append(hit[which == b].mean())
        ax.plot(xs, ys, marker="o", markersize=3, label=method)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="perfect calibration")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title="calibration, test splits of all sites and seeds")
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_km(predictions: dict[str, list[tuple[int, str, Predictions]]], methods: list[str], path: Path
            ) -> tuple[Path | None, list[dict[str, Any]]]:
    """Kaplan-Meier curves (lifelines) of the predicted high- and low-risk halves per method, with
    the log-rank p-value; returns the plot and a table row per method."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    methods = [m for m in methods if any(p.risk is not None for _, _, p in predictions.get(m, []))]
    if not methods:
        return None, []
    cols = min(3, len(methods))
    rows_n = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    table = []
    for ax, method in zip(axes.flat, methods, strict=False):
        time_, event, high = [], [], []
        for _, _, p in predictions[method]:
            if p.risk is None or len(p.risk) == 0:
                continue
            time_.append(p.time)
            event.append(p.event)
            high.append(p.risk > np.median(p.risk))
        t, e, h = np.concatenate(time_), np.concatenate(event).astype(int), np.concatenate(high)
        for name, group in (("low risk", ~h), ("high risk", h)):
            if group.any():
                fitter = KaplanMeierFitter(label=f"{name} (n={int(group.sum())})").fit(t[group], e[group])
                fitter.plot_survival_function(ax=ax, ci_show=True)
        p_value = logrank_test(t[h], t[~h], e[h], e[~h]).p_value if h.any() and (~h).any() else math.nan
        ax.set(title=f"{method}\nlog-rank p = {p_value:.2g}", xlabel="time", ylabel="survival", ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="lower left")
        table.append({"method": method, "patients": int(len(t)), "events": int(e.sum()), "log-rank p": p_value})
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    return _save(fig, path), table


def plot_epsilon(rounds: list[dict[str, Any]], path: Path) -> Path | None:
    """ε after each round (largest over sites for sample-level DP; the server's for client-level)."""
    keys = [k for k in ("epsilon", "client_dp_epsilon") if any(k in r for r in rounds)]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key in keys:
        for method in dict.fromkeys(r["method"] for r in rounds if key in r):
            by_round: dict[int, list[float]] = {}
            for r in rounds:
                if r["method"] == method and key in r:
                    by_round.setdefault(int(r["round"]), []).append(float(r[key]))
            xs = sorted(by_round)
            ax.plot(xs, [np.mean(by_round[x]) for x in xs], marker="o", markersize=3, label=f"{method} ({key})")
    ax.set(xlabel="round", ylabel="ε", title="privacy spent per round (mean over seeds)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_fusion_vs_unimodal(rows: list[dict[str, Any]], metric: str, path: Path) -> Path | None:
    """Bars per base method: the fused model next to each modality subset (mean +/- sd over seeds)."""
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(rows) + 2), 4))
    labels = [f"{r['base']}\n{r['model']}" for r in rows]
    ax.bar(range(len(rows)), [r["mean"] for r in rows], yerr=np.nan_to_num([r["sd"] for r in rows]), capsize=3,
           color=["#4477aa" if r["model"] == "fusion" else "#bbbbbb" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set(ylabel=f"{metric} (mean over sites)", title="fusion vs modality subsets")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
