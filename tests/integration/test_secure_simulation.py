"""Secure aggregation in Flower's simulation runtime (Ray), with the real ServerApp and ClientApp:
the global model equals plain modality-aware FedAvg's (same seeds) to within quantisation, a site
that drops after sending its masked input is still in the sum, and 2 sites are refused. Also the
real ClientApp and round loop over an in-process loopback Grid with DP-SGD at every site (DP noise
is drawn from the OS, so that run is checked for completion, ledgers and what the server received).

One round per run: the comparison is of one aggregation. (Over further rounds Adam amplifies the
float32 last-bit differences that quantisation leaves, ~1e-7, into differences of the order of the
learning rate, for plain and secure alike: that is training chaos, not an aggregation error.)"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from fedfusion.client.app import make_client_app
from fedfusion.client.secure_aggregation import TEST_DROP_AT_UNMASK_KEY
from fedfusion.common.config import ConfigError, Schema
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.flower_adapter import message_identity
from fedfusion.common.records import ARRAYS_KEY, EPSILON_KEY, METRICS_KEY
from fedfusion.common.secagg.testbed import with_simulation_keys
from fedfusion.server.federation import run_federation
from fedfusion.simulations.simulate import run_simulated_federation
from tests.secagg_fakes import LoopbackGrid
from tests.sitegen import OMICS, make_site

pytestmark = pytest.mark.integration

SITES = ("A", "B", "C")
ROUNDS = 1


@pytest.fixture(scope="module")
def federation_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small sites beside a shared images/ folder; C has no omics (modality-aware weights)."""
    root = tmp_path_factory.mktemp("secure-fed")
    images = root / "images"
    images.mkdir()
    for k, site in enumerate(SITES):
        path = make_site(root / f"tmp{site}", n=30, seed=10 + k)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for name in frame["image"]:
            (images / f"{site}-{Path(name).name}").write_bytes((path.parent / name).read_bytes())
        frame["image"] = [f"images/{site}-{Path(n).name}" for n in frame["image"]]
        frame["case_id"] = site + frame["case_id"]
        if site == "C":
            frame[list(OMICS)] = ""
        frame.to_csv(root / f"site-{site}.csv", index=False)
    return root


def _run_config(schema_path: Path, data_dir: Path, run_dir: Path, sites: tuple[str, ...] = SITES,
                **extra: Any) -> dict[str, Any]:
    return {"num-server-rounds": ROUNDS, "min-sites": len(sites), "seed": 3, "schema": str(schema_path),
            "run-dir": str(run_dir), "data-dir": str(data_dir), "sites": ",".join(sites), "local-epochs": 1,
            "local-batch-size": 16, "local-lr": 3e-3, "fusion": "concat", "local-device": "cpu",
            # the last round's weights: the comparison is of the aggregation, not of which round validates best
            "model-selection": "last", **extra}


SECURE = {"secure-aggregation": True, "secagg-clip": 1.0, "secagg-bits": 32, "secagg-weight-bound": 1000.0,
          "secagg-timeout": 60.0}


@pytest.fixture(scope="module")
def runs(federation_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A secure run in Flower's simulation runtime where site B drops out after sending its masked
    input (test hook: it answers the unmask stage with an error), and the plain reference: the same
    ClientApp and round loop with the same seeds, in process over a loopback Grid (no second Ray
    start-up; the sites train exactly as in simulation)."""
    out = tmp_path_factory.mktemp("secure-runs")
    schema_path = _schema().save(out / "schema.json")
    secure = run_simulated_federation(
        _run_config(schema_path, federation_data, out / "secure", **SECURE, **{TEST_DROP_AT_UNMASK_KEY: "B@1"}),
        len(SITES))
    plain = _in_process(_run_config(schema_path, federation_data, out / "plain"))
    return {"plain": plain, "secure": secure, "out": out}


def _in_process(run_config: dict[str, Any]) -> Any:
    """``run_federation`` with the real ClientApp behind a loopback Grid, one node per site."""
    nodes = [17, 2**63 + 9, 2**64 - 3][: len(str(run_config["sites"]).split(","))]
    run_config = with_simulation_keys(run_config, len(nodes))  # a secure run's sites need keys and a roster
    grid = LoopbackGrid(make_client_app(run_config), nodes,
                        node_configs={node: {"partition-id": i} for i, node in enumerate(nodes)})
    with message_identity(task_id=1, run_id=1, node_id=0):  # a run identity, as Flower's runtime sets in a ServerApp
        result = run_federation(grid, FederationConfig.from_run_config(run_config))
    result.grid = grid
    return result


def _schema() -> Schema:
    from fedfusion.common.config import ClinicalColumn, ImageSpec

    return Schema(name="toy", task="both", classes=("benign", "malignant"),
                  clinical=(ClinicalColumn("age"), ClinicalColumn("size_mm"),
                            ClinicalColumn("grade", kind="categorical", categories=("G1", "G2", "G3"))),
                  omics=OMICS, image=ImageSpec(size=(32, 32), channels=1))


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(run_dir / "model.pt", weights_only=False)["state_dict"].items()}


def test_secure_federation_equals_plain_fedavg(runs: dict[str, Any]) -> None:
    plain, secure = _weights(runs["out"] / "plain"), _weights(runs["out"] / "secure")
    assert plain.keys() == secure.keys()
    floats = [k for k, v in plain.items() if np.issubdtype(v.dtype, np.floating)]
    worst = max(float(np.abs(plain[k] - secure[k]).max()) for k in floats)
    assert worst < 1e-4, worst
    rows = {r["round"]: r for r in runs["secure"].rounds}
    assert rows[1]["secagg_masked"] == 3 and rows[1]["secagg_failed"] == 0 and rows[1]["sites_trained"] == 3
    assert rows[1]["secagg_clipped_fraction"] < 1e-6  # the clip bounds this model's round updates
    assert rows[1]["train_num-examples-omics"] < rows[1]["train_num-examples"]  # C has no omics
    # the server's record holds no per-site training metrics in a secure run
    assert not [m for m in runs["secure"].site_metrics if m["phase"] == "train"]
    header = next(csv.reader((runs["out"] / "secure" / "metrics.csv").open()))
    assert {"secagg_masked", "secagg_threshold", "secagg_recovered_dropouts", "secagg_clipped_fraction"} <= set(header)


def test_site_dropping_after_its_masked_input_is_still_aggregated(runs: dict[str, Any]) -> None:
    row = {r["round"]: r for r in runs["secure"].rounds}[1]
    assert (row["secagg_dropped_at_unmask"], row["secagg_recovered_dropouts"], row["secagg_masked"]) == (1, 1, 3)
    assert len([r for r in runs["secure"].rejected if "unmask" in r["phase"]]) == 1
    # and the global model equals the plain run's (test above): B's update is in the sum


def test_two_site_secure_run_is_refused(federation_data: Path, tmp_path: Path) -> None:
    schema_path = _schema().save(tmp_path / "schema.json")
    config = _run_config(schema_path, federation_data, tmp_path / "two", sites=("A", "B"), **SECURE)
    with pytest.raises(ConfigError, match="each site could subtract its own update"):
        run_simulated_federation(config, 2)
    assert not (tmp_path / "two" / "checkpoints").exists()  # nothing trained


def test_in_process_secure_run_with_dp_sgd(federation_data: Path, tmp_path: Path) -> None:
    schema_path = _schema().save(tmp_path / "schema.json")
    result = _in_process(_run_config(schema_path, federation_data, tmp_path / "dp", **SECURE, **{
        "dp-mode": "sample", "target-epsilon": 50.0, "target-delta": 1e-5, "dp-noise-multiplier": 0.8,
        "study": "secure-dp-test"}))
    row = {r["round"]: r for r in result.rounds}[1]
    assert (row["secagg_masked"], row["secagg_failed"], row["sites_refused"]) == (3, 0, 0)
    for site in SITES:  # each site charged its own ledger before its update left, masked
        assert "secure-dp-test" in (federation_data / f"privacy-ledger-{site}.json").read_text()
    train_replies = [r for r in result.grid.received if r.metadata.message_type.startswith("train")]
    assert len(train_replies) == 15  # 3 sites x 5 stages (4 + the consistency round)
    for reply in train_replies:  # no update, no count, no ε reached the server
        assert ARRAYS_KEY not in reply.content and METRICS_KEY not in reply.content
        assert EPSILON_KEY not in str(dict(reply.content.config_records))
