"""Per-case test predictions of the sites' own models (FedPer's private head, FedAvg+FT's fine-tuned copy,
Ditto's personal model): each simulated site writes them at the last round beside its personal state, no
reply carries them, their metric is the one the site reported, and the study runner finds and uses them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import Message

from fedfusion.client.app import make_client_app
from fedfusion.client.personalization import read_predictions, simulated_predictions_path
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.manifest import load_manifest
from fedfusion.common.personalization import personal_view
from fedfusion.common.training import metrics_from
from fedfusion.server.federation import run_federation
from fedfusion.simulations.study_runner import personal_predictions
from tests.dashboard_runs import toy_schema
from tests.secagg_fakes import LoopbackGrid
from tests.sitegen import make_site

pytestmark = pytest.mark.usefixtures("one_torch_thread", "flower_task_identity")
SITES = ("A", "B")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulation's data folder: schema.json and site-<name>.csv (30 toy cases each, 6 of them test)."""
    root = tmp_path_factory.mktemp("personal-predictions")
    toy_schema().save(root / "schema.json")
    for k, site in enumerate(SITES):
        frame = pd.read_csv(make_site(root / site, n=30, seed=k + 1), dtype=str, keep_default_na=False)
        frame["image"] = f"{site}/" + frame["image"]  # the site CSV sits in the data folder, its images below
        frame.to_csv(root / f"site-{site}.csv", index=False)
    return root


def _federate(data_dir: Path, run_dir: Path, **personal: Any) -> tuple[dict[str, Any], Any, LoopbackGrid]:
    """A 2-round in-process federation of simulated sites (partition ids, as Flower's simulation runs them)."""
    run_config = {"num-server-rounds": 2, "min-sites": 2, "seed": 5, "schema": str(data_dir / "schema.json"),
                  "data-dir": str(data_dir), "sites": ",".join(SITES), "run-dir": str(run_dir), "local-epochs": 1,
                  "local-batch-size": 16, "local-lr": 3e-3, "fusion": "concat", "local-device": "cpu",
                  "round-timeout": 60.0, "model-selection": "last", "study": f"preds-{run_dir.name}", **personal}
    grid = LoopbackGrid(make_client_app(run_config), [1, 2],
                        node_configs={1: {"partition-id": 0}, 2: {"partition-id": 1}})
    result = run_federation(grid, FederationConfig.from_run_config(run_config))  # type: ignore[arg-type]
    return run_config, result, grid


def _assert_no_reply_carries_predictions(grid: LoopbackGrid, case_ids: set[str]) -> None:
    """Every reply holds scalar metrics and short config values only: no per-case array, no case id."""
    replies: list[Message] = grid.received
    assert replies
    for reply in replies:
        if reply.metadata.message_type == "evaluate":
            assert not reply.content.array_records
        for record in reply.content.metric_records.values():
            assert all(isinstance(v, int | float) for v in record.values()), dict(record)
        for record in reply.content.config_records.values():
            assert not any(str(v) in case_ids for v in record.values())


@pytest.mark.parametrize(("personal", "kind", "key"), [
    ({"private-parts": "head"}, "private-parts", "c_index"),
    ({"personal-finetune-epochs": 1}, "finetune", "personal_c_index"),
    ({"ditto-lambda": 0.1}, "ditto", "personal_c_index"),
], ids=["fedper", "fedavg-ft", "ditto"])
def test_sites_keep_their_own_models_predictions_and_the_runner_uses_them(
        data_dir: Path, tmp_path: Path, personal: dict[str, Any], kind: str, key: str) -> None:
    run_config, result, grid = _federate(data_dir, tmp_path / kind, **personal)
    schema = toy_schema()
    evaluated = {m["site"]: m for m in result.site_metrics if m["phase"] == "evaluate" and m["round"] == 2}
    assert set(evaluated) == set(SITES)
    all_ids: set[str] = set()
    for site in SITES:
        assert not simulated_predictions_path(run_config, site, schema, 1).exists()  # the last round only
        path = simulated_predictions_path(run_config, site, schema, 2)
        assert path.parent == data_dir / "personal-state"  # the site's state folder in a simulation
        found = read_predictions(path)
        manifest = load_manifest(data_dir / f"site-{site}.csv", schema, check_images=False)
        test_ids = tuple(manifest.frame["case_id"].to_numpy()[manifest.rows("test")])
        assert (found.site_id, found.server_round, found.model, found.case_ids) == (site, 2, kind, test_ids)
        assert len(found.pred.risk) == len(found.pred.labels) == found.pred.probs.shape[0] == 6
        computed = metrics_from(found.pred)
        # simulations release full precision: the file's metric is exactly the one the site reported
        assert math.isfinite(evaluated[site][key])
        assert computed["c_index"] == pytest.approx(evaluated[site][key], abs=1e-6)
        assert computed["auc"] == pytest.approx(evaluated[site][key.replace("c_index", "auc")], abs=1e-6)
        all_ids.update(test_ids)

        # the study runner's loader: the row as the study records it (personal_view for FedAvg+FT)
        row = personal_view(evaluated[site], "c_index") if key.startswith("personal_") else evaluated[site]
        pred, why = personal_predictions(run_config, site, schema, row, "c_index", manifest)
        assert why == "" and pred is not None
        np.testing.assert_array_equal(pred.risk, found.pred.risk)
        np.testing.assert_array_equal(pred.event, found.pred.event)
        # ... and it refuses predictions that are not the reported model's
        assert personal_predictions(run_config, site, schema, {**row, "round": 1}, "c_index")[0] is None
        wrong = {**row, "c_index": float(row["c_index"]) + 0.01}
        assert personal_predictions(run_config, site, schema, wrong, "c_index")[1].startswith("c_index from")
        withheld = {**row, "c_index": math.nan}  # a site that released only counts: no interval either
        assert "released no c_index" in personal_predictions(run_config, site, schema, withheld, "c_index")[1]
    _assert_no_reply_carries_predictions(grid, all_ids)
    _assert_the_seed_records_them(run_config, result, data_dir, personal, kind)


def _assert_the_seed_records_them(run_config: dict[str, Any], result: Any, data_dir: Path, personal: dict[str, Any],
                                  kind: str) -> None:
    """The study runner's glue on this finished federation: the seed's record holds each site's kept
    predictions under the method, so intervals, ROC/KM and paired statistics include it."""
    from fedfusion.simulations.experiment import Method, StudyRecord, parse_study
    from fedfusion.simulations.study_runner import SeedRun

    study = parse_study({"dataset": "ovarian", "methods": ["fedavg"]})
    record = StudyRecord(study=study, out_dir=data_dir)
    run = SeedRun(study, 5, 1, data_dir / "seed-5", record, None, "token")
    run.metric, run.schema, run.schema_path, run.sites = "c_index", toy_schema(), data_dir / "schema.json", {}
    run.manifests = {s: load_manifest(data_dir / f"site-{s}.csv", run.schema, check_images=False) for s in SITES}
    run_dir = Path(run_config["run-dir"])
    run.run_configs[run_dir] = run_config  # what federate() records for the federations it runs
    run.federate = lambda *_: (result, run_dir)  # type: ignore[method-assign]
    run.run_federated(Method(kind, "federated", personal))
    kept = record.predictions[kind]
    assert [(seed, site) for seed, site, _ in kept] == [(5, s) for s in SITES] and not record.notes
    for (_, site, pred), row in zip(kept, [r for r in record.rows if r["method"] == kind], strict=True):
        assert row["site"] == site and row["n_test"] == 6 and row["events"] == float(np.sum(pred.event == 1))
        assert metrics_from(pred)["c_index"] == pytest.approx(row["c_index"], abs=1e-6)
