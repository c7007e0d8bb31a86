"""Study figures: integer round ticks, the 0.5 chance line on AUC / C-index, sd-over-seeds error bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fedfusion.simulations.study_plots as study_plots


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plot functions would save, kept open for inspection."""
    kept: list[Any] = []
    monkeypatch.setattr(study_plots, "_save", lambda fig, path: kept.append(fig) or path)
    return kept


def test_rounds_plot_has_integer_ticks_and_a_chance_line(figures: list[Any], tmp_path: Path) -> None:
    rounds = [{"method": "fedavg", "round": r, "seed": s, "c_index": 0.55 + 0.01 * r + 0.01 * s}
              for r in range(4) for s in (0, 1)]
    study_plots.plot_rounds(rounds, {"fedavg": {"family": "federated"}}, "c_index", tmp_path / "r.png")
    (ax,) = figures[0].axes
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert "chance (0.5)" in ax.get_legend_handles_labels()[1]


def test_sites_plot_draws_sd_over_seeds_and_the_chance_line(figures: list[Any], tmp_path: Path) -> None:
    by_site = [{"method": "fedavg", "site": s, "auc_mean": 0.7, "auc_sd": 0.05} for s in ("A", "B")]
    study_plots.plot_sites(by_site, ["fedavg"], "auc", tmp_path / "s.png")
    (ax,) = figures[0].axes
    assert "chance (0.5)" in ax.get_legend_handles_labels()[1]
    bars = [c for c in ax.containers if getattr(c, "errorbar", None) is not None]
    (segments,) = [c.errorbar.lines[2][0].get_segments() for c in bars]
    assert [round(float(seg[1, 1] - seg[0, 1]), 3) for seg in segments] == [0.1, 0.1]  # ± sd
