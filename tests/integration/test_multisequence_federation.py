"""A two-sequence imaging study federated end to end: three hospitals hold WDBC patients rendered as
"mean" and "worst" nucleus images, one hospital has no "worst" sequence at all. Through the real
ClientApp and round loop, with separate and with shared image encoders: the federation learns (AUC far
above chance), the hospital without the sequence reports no images of it, and a secure-aggregation
round delivers the same weights as the plain modality-aware FedAvg round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedfusion.client.app import make_client_app
from fedfusion.common.federation_config import FederationConfig
from fedfusion.server.federation import FederationResult, load_checkpoint, run_federation
from tests.secagg_fakes import LoopbackGrid, identity_config
from tests.wdbc_views import write_wdbc_views

SITES = {"A": set(), "B": set(), "C": {"worst"}}  # C: a hospital without the "worst" sequence
NODES = [101, 102, 103]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    root = tmp_path_factory.mktemp("wdbc_views_sites")
    manifests, schema = write_wdbc_views(root, 240, 32, sites=SITES)
    return manifests, schema.save(root / "schema.json")


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime


def _federate(study: tuple[dict[str, Path], Path], run_dir: Path, **extra: Any) -> FederationResult:
    manifests, schema_path = study
    run_config = {"num-server-rounds": 4, "min-sites": 3, "seed": 0, "schema": str(schema_path),
                  "run-dir": str(run_dir), "local-epochs": 2, "local-batch-size": 16, "local-lr": 3e-3,
                  "fusion": "attention", "local-device": "cpu", "round-timeout": 120.0, "model-selection": "last",
                  **extra}
    # each site's own signing key and the federation roster: a secure round's sites trust only roster peers
    node_configs = {node: {**identity_config(site), "manifest": str(manifests[site]), "schema": str(schema_path),
                           "site-id": site, "device": "cpu"} for node, site in zip(NODES, SITES, strict=True)}
    grid = LoopbackGrid(make_client_app(run_config), list(NODES), node_configs=node_configs)
    torch.set_num_threads(1)
    return run_federation(grid, FederationConfig.from_run_config(run_config))  # type: ignore[arg-type]


def _weights(result: FederationResult) -> dict[str, np.ndarray]:
    from fedfusion.common.records import arrays_to_numpy

    return arrays_to_numpy(result.arrays)


@pytest.mark.parametrize("image_encoders", ["separate", "shared"])
def test_multisequence_federation_learns_and_secure_equals_plain(study, tmp_path: Path, image_encoders: str) -> None:
    plain = _federate(study, tmp_path / "plain", **{"image-encoders": image_encoders})
    auc = {r["round"]: r["eval_auc"] for r in plain.rounds}
    assert auc[4] > 0.85 and auc[4] > auc[0], auc
    trained = {m["site"]: m for m in plain.site_metrics if m["phase"] == "train" and m["round"] == 1}
    assert trained["C"]["num-examples-image:worst"] == 0 and trained["A"]["num-examples-image:worst"] > 0
    assert trained["C"]["num-examples-image:mean"] > 0

    # One secure round against the plain run's round 1 (same global model in, same site training): across
    # more rounds Adam turns float-rounding differences of ~1e-7 into lr-sized steps, so only a round
    # compares exactly.
    secure = _federate(study, tmp_path / "secure", **{"image-encoders": image_encoders, "secure-aggregation": True,
                                                     "secagg-weight-bound": 1000.0, "secagg-timeout": 60.0,
                                                     "num-server-rounds": 1})
    a = load_checkpoint(tmp_path / "plain" / "checkpoints" / "round-0001.pt")["arrays"]
    b = _weights(secure)
    floats = [k for k, v in a.items() if np.issubdtype(v.dtype, np.floating)]
    if image_encoders == "separate":
        assert any(k.startswith("encoders.image:worst.") for k in floats)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in floats)
    assert worst < 1e-5, worst
    # the unmasked weights: the worst encoder's is the worst images, the shared encoder's all sequence images
    views = ("worst",) if image_encoders == "separate" else ("mean", "worst")
    key = "train_num-examples-image:worst" if image_encoders == "separate" else "train_num-examples-image"
    assert secure.rounds[1]["secagg_masked"] == 3 and secure.rounds[1][key] == pytest.approx(sum(
        m[f"num-examples-image:{v}"] for m in trained.values() for v in views), abs=0.01)
