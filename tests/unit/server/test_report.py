"""The run report shows ε per site per round (table + PNG) and the rounds sites refused."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedfusion.common.records import numpy_to_arrays
from fedfusion.server.federation import FederationResult
from fedfusion.server.report import epsilon_rows, epsilon_table, write_run_outputs


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
