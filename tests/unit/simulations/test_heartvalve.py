"""The longitudinal builders on the real SurvSet tables (heartvalve, csl): landmark design, long-format
manifest, a case-wise simulated split, and (integration) a federation through ``simulate()``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfusion.common.config import load_schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.longitudinal import VISIT_TIMES, VISIT_VALUES
from fedfusion.common.manifest import load_manifest
from fedfusion.simulations.datasets import CSL_LANDMARK, HEARTVALVE_LANDMARK, build_dataset
from fedfusion.simulations.partition import partition_manifest

pytest.importorskip("SurvSet")


@pytest.fixture(scope="module")
def heartvalve(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dataset("heartvalve", tmp_path_factory.mktemp("heartvalve"), seed=0)


def test_heartvalve_landmark_keeps_patients_at_risk_and_only_visits_up_to_the_landmark(heartvalve):
    schema = load_schema(heartvalve)
    manifest = load_manifest(heartvalve.parent / "manifest.csv", schema)
    frame = manifest.frame

    assert schema.modalities == ("clinical", "visits") and schema.visits.columns == ("grad", "lvmi", "ef")
    assert len(frame) == 237 and int(frame["event"].sum()) == 48  # of 256 patients / 54 deaths in the source
    assert (frame["time"] > 0).all()
    assert max(t.max() for t in frame[VISIT_TIMES]) <= HEARTVALVE_LANDMARK
    assert manifest.summary()["visits"] == {"total": 543, "median_per_case": 2.0, "cases_without": 0}
    # source patient 2: follow-up 9.663 years, echos at 0, 6.36, 7.30, 8.30 -> only the first is before L
    p2 = frame.index[frame["case_id"] == "heartvalve-0002"][0]
    assert frame.loc[p2, "time"] == pytest.approx(9.663014 - HEARTVALVE_LANDMARK, abs=1e-6)
    np.testing.assert_array_equal(frame.loc[p2, VISIT_TIMES], [0.0])
    np.testing.assert_allclose(frame.loc[p2, VISIT_VALUES], [[14.0, 114.93, 68.0]])
    assert frame.loc[p2, "valve_type"] == "homograft" and frame.loc[p2, "redo"] == "yes"
    raw = pd.read_csv(heartvalve.parent / "manifest.csv")
    assert len(raw) == 543 and raw["case_id"].nunique() == 237


def test_heartvalve_visit_tensors_use_train_statistics(heartvalve):
    manifest = load_manifest(heartvalve.parent / "manifest.csv", load_schema(heartvalve))
    pre = Preprocessor.fit(manifest)
    train = manifest.frame.iloc[manifest.rows("train")]
    ef = np.concatenate([v[:, 2] for v in train[VISIT_VALUES]])
    assert pre.visits_mean[2] == pytest.approx(np.nanmean(ef), abs=1e-9)
    item = MultimodalDataset(manifest, pre, "test")[0]
    assert item["visits"].shape == (8, 6) and item["visits_mask"].sum() >= 1


def test_csl_landmark(tmp_path):
    path = build_dataset("csl", tmp_path, seed=0)
    frame = load_manifest(path.parent / "manifest.csv", load_schema(path)).frame
    assert len(frame) == 332 and int(frame["event"].sum()) == 183
    assert max(t.max() for t in frame[VISIT_TIMES]) <= CSL_LANDMARK


def test_dirichlet_split_of_a_long_manifest_moves_whole_cases(heartvalve):
    schema = load_schema(heartvalve)
    pooled = pd.read_csv(heartvalve.parent / "manifest.csv", dtype=str, keep_default_na=False)
    sites = partition_manifest(heartvalve.parent / "manifest.csv", schema, "dirichlet", 3, seed=0, alpha=1.0)

    parts = {s: pd.read_csv(p, dtype=str, keep_default_na=False) for s, p in sites.items()}
    owners = pd.concat([p[["case_id"]].assign(site=s) for s, p in parts.items()]).drop_duplicates()
    assert owners["case_id"].is_unique  # no case is split between sites
    assert sum(len(p) for p in parts.values()) == len(pooled)  # every visit row lands somewhere
    record = json.loads((heartvalve.parent / "partition.json").read_text())
    assert sum(info["rows"] for info in record["sites"].values()) == 237  # counted per case
    assert sum(info["visit_rows"] for info in record["sites"].values()) == len(pooled)
    for site, path in sites.items():
        manifest = load_manifest(path, schema, allow_single_class=True)
        assert len(manifest) == record["sites"][site]["rows"]
        assert int(manifest.frame["event"].sum()) == record["sites"][site]["events"]


@pytest.mark.integration
def test_heartvalve_federates_through_simulate(tmp_path):
    from fedfusion.simulations.simulate import SimulationSpec, simulate

    spec = SimulationSpec(dataset="heartvalve", out_dir=tmp_path, partition="dirichlet", num_sites=3, rounds=2,
                          local_epochs=1, batch_size=32, seed=0, baselines=False, partition_options={"alpha": 1.0})
    report = simulate(spec)

    summary = json.loads((report.parent / "summary.json").read_text())
    federated = summary["mean_over_sites"]["federated (fedavg)"]
    assert 0.0 <= federated <= 1.0
    metrics = pd.read_csv(tmp_path / "federated" / "site_metrics.csv")
    train = metrics[metrics["phase"] == "train"]
    assert (train["num-examples-visits"] > 0).all()  # the visits encoder is averaged as its own modality
