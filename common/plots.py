"""PNG figures people put in reports: ROC curves, Kaplan-Meier by predicted risk, training curves.

Lives in ``common`` because both the server's round reports and the simulations' study reports
draw them; matplotlib runs headless (Agg) since sites and CI have no display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """One-vs-rest ROC per class (binary: the positive class only)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    targets = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    for k in targets:
        positive = labels == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive.astype(int), probs[:, k])
        ax.plot(fpr, tpr, label=f"{classes[k]}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC")
    ax.legend(loc="lower right")
    return _save(fig, path)


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Product-limit estimate: step times and survival just after each."""
    order = np.argsort(time)
    time, event = time[order], event[order]
    unique = np.unique(time[event > 0])
    survival, current = [], 1.0
    for t in unique:
        at_risk = (time >= t).sum()
        deaths = ((time == t) & (event > 0)).sum()
        current *= 1.0 - deaths / at_risk
        survival.append(current)
    return np.concatenate([[0.0], unique]), np.concatenate([[1.0], survival])


def plot_km_by_risk(time: np.ndarray, event: np.ndarray, risk: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Kaplan-Meier curves of the predicted high- and low-risk halves (median split of the risk)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    high = risk > np.median(risk)
    for name, group in (("low risk", ~high), ("high risk", high)):
        if group.sum() == 0:
            continue
        t, s = kaplan_meier(time[group], event[group])
        ax.step(t, s, where="post", label=f"{name} (n={int(group.sum())})")
    ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02), title=title or "Kaplan-Meier by risk")
    ax.legend(loc="lower left")
    return _save(fig, path)


#: Metrics whose chance level is 0.5 (random scores): their plots draw that line for reference.
CHANCE_LEVEL = {"auc": 0.5, "c_index": 0.5}


def chance_level(metric: str) -> float | None:
    """0.5 for AUC / C-index (also ``eval_auc``, ``val_c_index``, ...), None for other metrics."""
    return next((level for name, level in CHANCE_LEVEL.items() if metric == name or metric.endswith(f"_{name}")),
                None)


def _chance_line(ax: plt.Axes, level: float | None) -> None:
    if level is not None:
        ax.axhline(level, linestyle="--", color="grey", linewidth=0.9, label=f"chance ({level:g})")


def curves_figure(rows: Sequence[Mapping[str, float]], x: str, ys: Sequence[str], title: str = "",
                  reference: float | None = None) -> plt.Figure:
    """The figure of :func:`plot_curves` (not saved), for callers and tests that inspect its axes."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = [r[x] for r in rows]
    for key in ys:
        values = [r.get(key, np.nan) for r in rows]
        if not np.all(np.isnan(np.asarray(values, dtype=float))):
            ax.plot(xs, values, marker="o", markersize=3, label=key)
    _chance_line(ax, reference)
    ax.set(xlabel=x, title=title)
    if xs and all(float(v).is_integer() for v in xs):  # rounds and epochs: no "round 0.5" ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_curves(rows: Sequence[Mapping[str, float]], x: str, ys: Sequence[str], path: str | Path,
                title: str = "", reference: float | None = None) -> Path:
    """Lines of ``ys`` against ``x`` from a list of metric rows (epochs or rounds: integer ticks);
    ``reference`` draws a dashed horizontal line (the 0.5 chance level of an AUC or C-index)."""
    return _save(curves_figure(rows, x, ys, title, reference), path)


def bars_figure(values: Mapping[str, float], ylabel: str, title: str = "",
                errors: Mapping[str, tuple[float, float]] | None = None, reference: float | None = None) -> plt.Figure:
    """The figure of :func:`plot_bars` (not saved). ``errors`` maps a bar to its interval
    ``(low, high)`` (a 95 % CI, or mean -/+ sd); a bar without one gets no error bar."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(values) + 2), 3.8))
    names = list(values)
    heights = np.array([values[n] for n in names], dtype=float)
    yerr = None
    if errors:
        low = np.array([errors.get(n, (np.nan, np.nan))[0] for n in names], dtype=float)
        high = np.array([errors.get(n, (np.nan, np.nan))[1] for n in names], dtype=float)
        # matplotlib wants distances below/above the bar; a missing interval draws nothing
        yerr = np.nan_to_num(np.vstack([heights - low, high - heights]).clip(min=0))
    ax.bar(names, heights, color="#4477aa", yerr=yerr, capsize=3 if yerr is not None else 0)
    _chance_line(ax, reference)
    ax.set(ylabel=ylabel, title=title)
    if reference is not None:
        ax.legend(loc="lower right", fontsize=8)
    ax.tick_params(axis="x", rotation=30)
    return fig


def plot_bars(values: Mapping[str, float], path: str | Path, ylabel: str, title: str = "",
              errors: Mapping[str, tuple[float, float]] | None = None, reference: float | None = None) -> Path:
    """One bar per site/method, e.g. per-site test AUC; optional error intervals and reference line."""
    return _save(bars_figure(values, ylabel, title, errors, reference), path)
