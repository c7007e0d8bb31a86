"""``fedfusion explain`` on schemas beyond one image: a Grad-CAM per image sequence (separate or shared
encoders; a shared backbone's map is taken from the call on that sequence) and permutation importance
of the whole ``visits`` modality on a real longitudinal data set (heartvalve)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfusion.common.config import ModelConfig, load_schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.manifest import load_manifest
from fedfusion.common.models import create_model
from fedfusion.simulations.explain import explain_run, split_tensors
from fedfusion.simulations.gradcam import find_target_layer, grad_cam
from tests.wdbc_views import write_wdbc_views

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save_model(run: Path, schema_dict: dict, model: torch.nn.Module, run_config: dict) -> None:
    (run / "federated").mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "schema": schema_dict, "run_config": run_config},
               run / "federated" / "model.pt")


@pytest.mark.parametrize("image_encoders", ["separate", "shared"])
def test_explain_draws_a_grad_cam_per_sequence(tmp_path: Path, image_encoders: str) -> None:
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    _, schema = write_wdbc_views(data, 60, 32, sites={"site-A": set(), "site-B": {"worst"}})
    schema.save(data / "schema.json")
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion="attention", image_encoders=image_encoders))
    _save_model(tmp_path / "run", schema.to_dict(), model, {"fusion": "attention", "image-encoders": image_encoders,
                                                             "sites": "A,B", "data-dir": str(data)})
    report = explain_run(tmp_path / "run", n_cases=2, n_repeats=1)
    with (report.parent / "gradcam.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    made = {(r["site"], r["modality"]) for r in rows}
    assert made == {("A", "image:mean"), ("A", "image:worst"), ("B", "image:mean")}  # B has no worst images
    assert all((report.parent / r["png"]).is_file() for r in rows)
    with (report.parent / "permutation_importance.csv").open() as handle:
        whole = {r["modality"] for r in csv.DictReader(handle) if r["feature"] == "*"}
    assert whole == {"image:mean", "image:worst"}
    text = report.read_text()
    assert "`image:mean`: target layer" in text and "`image:worst`: target layer" in text

    # each sequence's map comes from its own backbone call: the two views of a case give two maps
    manifest = load_manifest(data / "site-A.csv", schema, check_images=False)
    tensors = split_tensors(MultimodalDataset(manifest, Preprocessor.fit(manifest), "test"))
    both = np.flatnonzero(tensors["mask"].numpy().all(axis=1))[:2]
    batch = {k: v[torch.from_numpy(both)] for k, v in tensors.items()}
    maps = {}
    for key in ("image:mean", "image:worst"):
        encoder = model.encoders[key] if key in model.encoders else model.encoders["image"]
        _, layer = find_target_layer(encoder.backbone, 1, (32, 32))
        shared = encoder.backbone if key not in model.encoders else None
        maps[key], _ = grad_cam(model, batch, layer, target=1, key=key, backbone=shared)
    assert not np.allclose(maps["image:mean"], maps["image:worst"])


def test_explain_permutes_the_visit_history_of_a_longitudinal_run(tmp_path: Path) -> None:
    from fedfusion.simulations.datasets import build_dataset

    pytest.importorskip("SurvSet")
    schema_path = build_dataset("heartvalve", tmp_path / "data", seed=0)
    shutil.copy(schema_path.parent / "manifest.csv", schema_path.parent / "site-A.csv")
    schema = load_schema(schema_path)
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion="attention"))
    _save_model(tmp_path / "run", schema.to_dict(), model, {"fusion": "attention", "sites": "A",
                                                             "data-dir": str(schema_path.parent)})
    report = explain_run(tmp_path / "run", n_cases=1, n_repeats=2)
    with (report.parent / "permutation_importance.csv").open() as handle:
        rows = {(r["site"], r["modality"], r["feature"]): r for r in csv.DictReader(handle)}
    visits = rows[("A", "visits", "*")]
    assert int(visits["n_rows"]) > 0 and np.isfinite(float(visits["importance_mean"]))
    assert "No image modality." in report.read_text()
