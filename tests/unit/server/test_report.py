"""The run report shows ε per site per round (table + PNG) and the rounds sites refused."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fedfusion.common.plots import bars_figure, chance_level, curves_figure
from fedfusion.common.records import numpy_to_arrays
from fedfusion.server.federation import FederationResult
from fedfusion.server.report import (
    delivered_title,
    epsilon_rows,
    epsilon_table,
    noise_rows,
    noise_warnings,
    write_run_outputs,
)


def _result(run_dir: Path) -> FederationResult:
    train = [
        {"round": r, "phase": "train", "site": s, "num-examples": 10, "epsilon": eps}
        for r, s, eps in ((1, "A", 0.8), (1, "B", 0.5), (2, "B", 0.9))
    ]
    evaluate = [{"round": 2, "phase": "evaluate", "site": s, "num-examples": 5, "auc": 0.7} for s in ("A", "B")]
    return FederationResult(
        arrays=numpy_to_arrays({"w": np.zeros(2, dtype=np.float32)}),
        rounds=[
            {"round": 0, "eval_auc": 0.5},
            {"round": 1, "eval_auc": 0.6, "train_epsilon": 0.8},
            {"round": 2, "eval_auc": 0.7, "train_epsilon": 0.9, "sites_refused": 1},
        ],
        site_metrics=train + evaluate,
        run_dir=run_dir,
        refusals=[{"round": 2, "site": "A", "reason": "study 's': past the budget", "epsilon": 0.8}],
    )


def test_epsilon_per_site_per_round_is_tabled_and_plotted(tmp_path: Path) -> None:
    result = _result(tmp_path)
    rows = epsilon_rows(result)
    assert [(r["round"], r["site"], r["status"]) for r in rows] == [
        (1, "A", "trained"),
        (1, "B", "trained"),
        (2, "A", "refused"),
        (2, "B", "trained"),
    ]
    assert epsilon_table(rows) == [
        {"site": "A", "round 1": "0.800", "round 2": "refused (0.800)"},
        {"site": "B", "round 1": "0.500", "round 2": "0.900"},
    ]
    report = write_run_outputs(result).read_text()
    assert "## Privacy: ε spent per site" in report and "| A | 0.800 | refused (0.800) |" in report
    assert "## Refused rounds" in report and "past the budget" in report
    assert (tmp_path / "epsilon_per_site.png").stat().st_size > 0
    with (tmp_path / "privacy.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4


def test_no_privacy_section_without_dp(tmp_path: Path) -> None:
    result = _result(tmp_path)
    result.site_metrics = [{k: v for k, v in m.items() if k != "epsilon"} for m in result.site_metrics]
    result.refusals = []
    report = write_run_outputs(result).read_text()
    assert "Privacy" not in report and not (tmp_path / "epsilon_per_site.png").exists()


def _survival_result(run_dir: Path) -> FederationResult:
    """Three rounds, best validation at round 2; site B's budget was nearly spent (σ 11.8, asked 1.2)."""
    train = [{"round": r, "phase": "train", "site": s, "num-examples": 109.0, "epsilon": 0.5 * r,
              "noise-multiplier": sigma, "noise-multiplier-asked": 1.2}
             for r in (1, 2, 3) for s, sigma in (("A", 1.2), ("B", 11.8 if r == 3 else 1.25))]
    evaluate = [{"round": r, "phase": "evaluate", "site": s, "num-examples": 40.0, "n": 40.0, "events": ev,
                 "c_index": 0.6 + 0.01 * r, "c_index_ci_low": 0.5, "c_index_ci_high": 0.7}
                for r in (0, 1, 2, 3) for s, ev in (("A", 17.0), ("B", 9.0))]
    rounds = [{"round": 0, "eval_c_index": 0.55, "eval_num-examples": 80.0}]
    rounds += [{"round": r, "sites_trained": 2, "train_phase_seconds": 1.5, "slowest_site_train_seconds": 1.0,
                "round_overhead_seconds": 0.5, "train_loss": 3.0 - 0.1 * r, "train_num-examples": 218.0,
                "train_epsilon": 0.5 * r, "sites_refused": 0, "eval_c_index": 0.6 + 0.01 * r,
                "eval_val_c_index": 0.58 + 0.01 * r, "eval_num-examples": 80.0, "seconds": 2.0} for r in (1, 2, 3)]
    return FederationResult(arrays=numpy_to_arrays({"w": np.zeros(2, dtype=np.float32)}), rounds=rounds,
                            site_metrics=train + evaluate, run_dir=run_dir, selected_round=2, selection="best-val")


def test_report_top_names_test_n_and_events_and_the_rounds_table_is_short(tmp_path: Path) -> None:
    report = write_run_outputs(_survival_result(tmp_path)).read_text()

    top = report.split("## Rounds")[0]
    assert "| site | test n | events | c_index | 95 % CI |" in top
    assert "| A | 40 | 17 | 0.620 | 0.500 to 0.700 |" in top  # the delivered round (2), not the last
    rounds = next(block for block in report.split("## Rounds")[1].split("\n\n") if block.startswith("| round"))
    header = rounds.splitlines()[0].strip("|").split("|")
    assert [h.strip() for h in header] == ["round", "train loss", "test c_index", "val c_index", "ε", "sites trained"]
    cells = [line.strip("|").split("|") for line in rounds.splitlines()[2:]]
    assert [c[0].strip() for c in cells] == ["0", "1", "2", "3"]  # counts print as integers, not 109.0000
    assert [c[-1].strip() for c in cells] == ["", "2", "2", "2"]
    assert "| 1 | 2.9000 | 0.6100 | 0.5900 | 0.5000 | 2 |" in rounds
    with (tmp_path / "metrics.csv").open() as handle:
        full = list(csv.DictReader(handle))
    assert "round_overhead_seconds" in full[1] and float(full[3]["sigma_B"]) == 11.8  # the full table stays


def test_a_site_whose_sigma_far_exceeds_the_asked_one_is_flagged(tmp_path: Path) -> None:
    result = _survival_result(tmp_path)
    rows = noise_rows(result)
    assert [(r["round"], r["site"], r["sigma"]) for r in rows][-2:] == [(3, "A", 1.2), (3, "B", 11.8)]
    assert noise_warnings(rows) == ["site B trained round 3 with σ 11.8 (asked 1.2): its budget is nearly spent; "
                                    "its update is mostly noise"]
    report = write_run_outputs(result).read_text()
    assert report.count("**Warning:** site B trained round 3 with σ 11.8 (asked 1.2)") == 2  # top and privacy section
    assert "| B | 1.2 | 1.25 | 1.25 | 11.8 |" in report  # σ per site per round
    assert "site A trained" not in report


def test_per_round_plots_have_integer_ticks_and_a_chance_line_and_the_site_plot_names_its_round(
        tmp_path: Path) -> None:
    result = _survival_result(tmp_path)
    assert delivered_title(result) == "delivered model, round 2 (best validation)"
    fig = curves_figure(result.rounds, "round", ["eval_c_index", "eval_val_c_index"], reference=chance_level("c_index"))
    (ax,) = fig.axes
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in ax.get_lines())  # the chance line
    bars = bars_figure({"A": 0.62, "B": 0.6}, "c_index", errors={"A": (0.5, 0.7)}, reference=0.5)
    (bax,) = bars.axes
    assert len(bax.collections) == 1  # the error bars (one LineCollection), only where an interval exists
    segments = bax.collections[0].get_segments()
    assert [tuple(np.round(seg[:, 1], 3)) for seg in segments] == [(0.5, 0.7), (0.6, 0.6)]
    write_run_outputs(result)
    assert (tmp_path / "site_c_index.png").stat().st_size > 0 and (tmp_path / "global_c_index_per_round.png").exists()


@pytest.mark.parametrize(("selection", "phrase"), [
    ("best-val", "the best site-weighted validation score"),
    ("best-val-loss", "the lowest site-weighted validation loss"),
])
def test_the_report_names_the_rule_that_chose_the_delivered_round(selection: str, phrase: str,
                                                                   tmp_path: Path) -> None:
    result = _survival_result(tmp_path)
    result.selection = selection
    report = write_run_outputs(result).read_text()
    assert f"The model of round 2: {phrase}" in report and f'`model-selection = "{selection}"`' in report
    assert "The model of the last round" not in report
