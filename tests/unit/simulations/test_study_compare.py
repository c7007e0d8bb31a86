"""Cross-study tables recompute the report's numbers from results.csv: FLamby's mean over sites per
seed, mean ± sd over seeds, paired differences, the goal verdicts and fusion vs best modality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedfusion.common.results import write_rows
from fedfusion.simulations.study_compare import (
    CompareError,
    fusion_table,
    goal_table,
    load_study_output,
    main,
    methods_table,
)

# (method, family, base_method): per seed, per site (A, B) AUC
_VALUES = {
    ("pooled", "baseline", ""): [(0.90, 0.80), (0.92, 0.84)],
    ("best local-only", "best-local", ""): [(0.86, 0.78), (0.88, 0.80)],
    ("fedavg", "federated", ""): [(0.89, 0.80), (0.90, 0.78)],
    ("pooled [image only]", "unimodal", "pooled"): [(0.70, 0.60), (0.72, 0.64)],
    ("pooled [clinical only]", "unimodal", "pooled"): [(0.88, 0.82), (0.91, float("nan"))],
}


def _study(folder: Path, alpha: float = 0.3) -> Path:
    rows = [{"seed": seed, "method": m, "family": fam, "site": site, "auc": v, "base_method": base}
            for (m, fam, base), seeds in _VALUES.items() for seed, pair in enumerate(seeds)
            for site, v in zip(("A", "B"), pair, strict=True)]
    write_rows(folder / "results.csv", rows)
    (folder / "summary.json").write_text(json.dumps({"study": "toy", "dataset": "wdbc-multimodal", "metric": "auc",
                                                     "best_local_site": "A"}))
    (folder / "study.json").write_text(json.dumps({"partition": "dirichlet", "partition_options": {
        "alpha": alpha, "missing_modality": "image", "missing_sites": 1, "missing_fraction": 0.2}}))
    return folder


def test_numbers_are_the_mean_over_sites_then_mean_and_sd_over_seeds(tmp_path: Path) -> None:
    study = load_study_output(_study(tmp_path))

    fedavg_seeds = [np.mean([0.89, 0.80]), np.mean([0.90, 0.78])]
    assert study.seeds("fedavg") == pytest.approx({0: fedavg_seeds[0], 1: fedavg_seeds[1]}, abs=1e-9)
    mean, sd = study.summary("fedavg")
    assert mean == pytest.approx(np.mean(fedavg_seeds), abs=1e-9)
    assert sd == pytest.approx(np.std(fedavg_seeds, ddof=1), abs=1e-9)
    # a NaN site (one-class test split) is skipped, not counted as 0
    assert study.seeds("pooled [clinical only]")[1] == pytest.approx(0.91)

    table = {r["method"]: r["toy auc"] for r in methods_table([study])}
    assert list(table) == ["pooled", "best local-only", "fedavg"]
    assert table["fedavg"] == f"{np.mean(fedavg_seeds):.3f} ± {np.std(fedavg_seeds, ddof=1):.3f}"
    assert table["best local-only"].endswith("(A)")


def test_goal_verdicts_compare_means_and_report_paired_differences(tmp_path: Path) -> None:
    (row,) = goal_table([load_study_output(_study(tmp_path))], margin=0.02)

    # fedavg 0.8425, best local 0.83 -> yes; pooled 0.865 - 0.02 = 0.845 > 0.8425 -> no
    assert row["study"] == "toy" and row["method"] == "fedavg"
    assert row[">= best local-only?"] == "yes" and row[">= pooled - 0.02?"] == "no"
    deltas = [np.mean([0.89, 0.80]) - np.mean([0.90, 0.80]), np.mean([0.90, 0.78]) - np.mean([0.92, 0.84])]
    assert row["Δ vs pooled"] == f"{np.mean(deltas):.3f} ± {np.std(deltas, ddof=1):.3f}"
    (loose,) = goal_table([load_study_output(tmp_path)], margin=0.05)
    assert loose[">= pooled - 0.05?"] == "yes"


def test_fusion_table_names_the_best_single_modality_and_the_partition(tmp_path: Path) -> None:
    (row,) = fusion_table([load_study_output(_study(tmp_path))])

    assert row["study"] == "dirichlet alpha=0.3, image missing (1 site(s) + 20% of rows elsewhere)"
    assert row["pooled best unimodal"].endswith("(clinical only)")  # 0.865 over seeds beats image's 0.665
    deltas = [np.mean([0.90, 0.80]) - np.mean([0.88, 0.82]), np.mean([0.92, 0.84]) - 0.91]
    assert row["pooled Δ"] == f"{np.mean(deltas):.3f} ± {np.std(deltas, ddof=1):.3f}"
    assert "fedavg fusion" not in row  # no federated unimodal arms in this study


def test_a_folder_without_results_is_an_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(CompareError, match=r"missing results\.csv, summary\.json, study\.json"):
        load_study_output(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 2 and str(tmp_path) in capsys.readouterr().err
    study = _study(tmp_path / "done")
    assert main([str(study)]) == 0
    out = capsys.readouterr().out
    assert "## Fusion vs best single modality" in out and "| fedavg |" in out
