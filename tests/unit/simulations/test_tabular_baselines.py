"""Tree/linear baselines: same preprocessing as the network, real numbers on shipped data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfusion.common.config import Schema, load_schema
from fedfusion.common.data import Preprocessor
from fedfusion.common.manifest import load_manifest
from fedfusion.simulations.datasets import build_dataset
from fedfusion.simulations.partition import partition_manifest
from fedfusion.simulations.tabular_baselines import (
    TableBuilder,
    run_site_tabular_baselines,
    run_tabular_baselines,
)
from tests.sitegen import make_site


@pytest.fixture(scope="module")
def wdbc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wdbc")
    build_dataset("wdbc-multimodal", out, seed=0)
    return out


@pytest.fixture(scope="module")
def lung(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lung")
    build_dataset("lung", out, seed=0)
    return out


def test_wdbc_clinical_table_random_forest_reaches_auc_095(wdbc: Path) -> None:
    schema = load_schema(wdbc / "schema.json")
    split = pd.read_csv(wdbc / "manifest.csv")["split"].value_counts()

    result = run_tabular_baselines(wdbc / "manifest.csv", schema, seed=0)

    assert result["primary_metric"] == "auc"
    assert set(result["models"]) == {"random_forest", "gradient_boosting", "logistic_regression"}
    assert result["n_train"] == split["train"] and result["n_test"] == split["test"]
    assert result["n_features"] == 20  # 20 clinical values; their missing flags are constant (none missing)
    assert result["models"]["random_forest"]["auc"] >= 0.95, result["models"]
    for metrics in result["models"].values():
        assert {"auc", "balanced_accuracy", "ece", "brier", "accuracy"} <= set(metrics)
        assert metrics["auc"] >= 0.9


def test_ovarian_cox_on_genes_and_debulking_ranks_recurrence(tmp_path: Path) -> None:
    pytest.importorskip("SurvSet")
    build_dataset("ovarian", tmp_path, seed=0)
    schema = load_schema(tmp_path / "schema.json")

    result = run_tabular_baselines(tmp_path / "manifest.csv", schema, seed=0, models=["cox_ph"])

    assert result["primary_metric"] == "c_index"
    assert result["n_features"] == 158 + 2  # genes + debulking one-hot (no case lacks debulking)
    cox = result["models"]["cox_ph"]
    assert cox["c_index"] > 0.55, cox
    assert cox["n"] == result["n_test"] and cox["events"] > 50


def test_lung_survival_models_and_optional_survival_forest(lung: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = load_schema(lung / "schema.json")

    result = run_tabular_baselines(lung / "manifest.csv", schema, seed=0)
    monkeypatch.setitem(sys.modules, "sksurv.ensemble", None)  # as if the optional GPL extra were absent
    without = run_tabular_baselines(lung / "manifest.csv", schema, seed=0)

    if "random_survival_forest" in result["models"]:
        assert result["models"]["random_survival_forest"]["c_index"] > 0.55
    assert result["models"]["cox_ph"]["c_index"] > 0.55, result["models"]
    assert set(without["models"]) == {"cox_ph"}
    assert "scikit-survival is not installed" in without["skipped"]["random_survival_forest"]


def test_table_is_the_networks_preprocessing_fitted_on_train(schema: Schema, tmp_path: Path) -> None:
    manifest = load_manifest(
        make_site(tmp_path / "toy", n=40, with_images=False),
        schema.with_modalities(("clinical", "omics")),
        check_images=False,
    )
    pre = Preprocessor.fit(manifest)

    builder = TableBuilder.fit(manifest)
    table = builder.table(manifest, "test")

    rows = manifest.rows("test")
    frame = manifest.frame.iloc[rows]
    x = pd.DataFrame(table.x, columns=table.columns)
    expected_age = (frame["age"].to_numpy() - pre.clinical_mean[0]) / pre.clinical_std[0]
    assert np.allclose(x["age"], expected_age)
    assert "age_missing" not in x  # no age is missing in training rows: a constant column is dropped
    assert np.array_equal(x["size_mm_missing"], frame["size_mm"].isna().to_numpy(dtype=float))
    assert np.array_equal(x["grade=G2"], (frame["grade"] == "G2").to_numpy(dtype=float))
    expected_gene = (frame["gene0"].to_numpy() - pre.omics_mean[0]) / pre.omics_std[0]
    assert np.allclose(x["gene0"], expected_gene)
    assert np.array_equal(table.labels, (frame["label"] == "malignant").to_numpy(dtype=int))
    assert np.allclose(table.time, frame["time"]) and np.array_equal(table.event, frame["event"])


def test_wide_omics_keep_the_highest_variance_training_features(schema: Schema, tmp_path: Path) -> None:
    manifest = load_manifest(
        make_site(tmp_path / "toy", n=40, with_images=False), schema.with_modalities(("omics",)), check_images=False
    )

    builder = TableBuilder.fit(manifest, max_omics=2)

    kept = [schema.omics[i] for i in builder.omics_keep]
    assert kept == [schema.omics[i] for i in sorted(np.argsort(-builder.preprocessor.omics_std)[:2])]
    assert set(kept) <= set(builder.table(manifest, "train").columns)


def test_pooled_and_local_only_rows_for_every_site(lung: Path, tmp_path: Path) -> None:
    schema = load_schema(lung / "schema.json")
    for name in ("manifest.csv", "schema.json"):
        (tmp_path / name).write_bytes((lung / name).read_bytes())
    sites = partition_manifest(tmp_path / "manifest.csv", schema, "iid", num_sites=3, seed=0)

    rows = run_site_tabular_baselines(tmp_path / "manifest.csv", sites, schema, seed=0, models=["cox_ph"])

    assert [(r["site"], r["method"]) for r in rows] == [
        (s, m) for s in ("site1", "site2", "site3") for m in ("pooled cox_ph", "local-only cox_ph")
    ]
    assert all(0.0 <= r["c_index"] <= 1.0 for r in rows)


def test_single_class_training_rows_are_reported_not_a_crash(schema: Schema, tmp_path: Path) -> None:
    path = make_site(tmp_path / "toy", n=40, with_images=False)
    frame = pd.read_csv(path)
    frame.loc[frame["split"] == "train", "label"] = "benign"
    frame.to_csv(path, index=False)

    result = run_tabular_baselines(path, schema, seed=0, models=["random_forest", "cox_ph"])

    assert result["skipped"] == {"random_forest": "the training rows hold a single class"}
    assert set(result["models"]) == {"cox_ph"}


def test_unknown_model_and_image_only_schema_are_explained(schema: Schema, tmp_path: Path) -> None:
    path = make_site(tmp_path / "toy", n=40, with_images=True)

    with pytest.raises(ValueError, match=r"unknown tabular model\(s\) \['xgboost'\]"):
        run_tabular_baselines(path, schema, seed=0, models=["xgboost"])
    with pytest.raises(ValueError, match="no clinical table"):
        run_tabular_baselines(path, schema.with_modalities(("image",)), seed=0)
