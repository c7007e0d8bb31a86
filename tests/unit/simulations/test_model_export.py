"""``fedfusion export``: a real federated run's model.pt -> ONNX / TorchScript with one site's preprocessing.

Each run is the coordinator's real round loop driving the real ClientApp in process
(``tests.dashboard_runs.run_in_process``). The exported file is read back the way a deployment reads
it (``torch.jit.load``, ``onnxruntime.InferenceSession``), fed RAW values (NaN for missing, category
indices, pixels), and must give the PyTorch model's outputs on the site's own pipeline to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import default_collate

from fedfusion.cli import main
from fedfusion.client.app import make_client_app
from fedfusion.common.config import ClinicalColumn, ImageSpec, Schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.manifest import load_manifest
from fedfusion.common.models.export import ExportableModel
from fedfusion.simulations.explain import load_global_model
from fedfusion.simulations.model_export import (
    ExportError,
    export_run,
    raw_inputs,
    read_metadata,
    run_export,
)
from tests.dashboard_runs import InProcessGrid, run_in_process
from tests.sitegen import OMICS, make_site

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _survival_schema() -> Schema:
    """Like ovarian: survival from clinical (numeric + a categorical factor) and a gene panel; no image."""
    return Schema(name="ovarian-like", task="survival",
                  clinical=(ClinicalColumn("age"), ClinicalColumn("size_mm"),
                            ClinicalColumn("grade", kind="categorical", categories=("G1", "G2", "G3"))),
                  omics=OMICS)


def _image_schema() -> Schema:
    return Schema(name="image-cls", task="classification", classes=("benign", "malignant"),
                  clinical=(ClinicalColumn("age"),), image=ImageSpec(size=(32, 32), channels=1))


def _run(root: Path, schema: Schema, nodes: dict[int, dict], **config: object) -> Path:
    schema_path = schema.save(root / "schema.json")
    run_config = {"num-server-rounds": 1, "min-sites": 2, "seed": 2, "schema": str(schema_path),
                  "run-dir": str(root / "run"), "local-epochs": 1, "local-batch-size": 16, "round-timeout": 60.0,
                  "sim-min-eval-cases": 0, **config}
    for node in nodes.values():
        node.setdefault("schema", str(schema_path))
    run_in_process(InProcessGrid(make_client_app(run_config), nodes), run_config)
    return root / "run"


@pytest.fixture(scope="module")
def survival_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two simulated sites (``sites`` + ``data-dir/site-<s>.csv``, as `fedfusion simulate` lays them out)."""
    root = tmp_path_factory.mktemp("survival")
    data = root / "data"
    for seed, site in enumerate(("A", "B"), start=1):
        frame = pd.read_csv(make_site(root / site, n=30, seed=seed, with_images=False))
        data.mkdir(exist_ok=True)
        frame.drop(columns=["image", "label"]).to_csv(data / f"site-{site}.csv", index=False)
    nodes = {1: {"partition-id": 0, "device": "cpu"}, 2: {"partition-id": 1, "device": "cpu"}}
    return _run(root, _survival_schema(), nodes, sites="A,B", **{"data-dir": str(data), "fusion": "concat"})


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two deployed-style sites (node config names each manifest); site 1 lacks some images."""
    root = tmp_path_factory.mktemp("image")
    nodes = {}
    for node in (1, 2):
        manifest = make_site(root / f"site{node}", n=20, seed=node)
        frame = pd.read_csv(manifest, keep_default_na=False)
        if node == 1:
            frame.loc[frame.index % 4 == 0, "image"] = ""  # missing modality: mask input False there
        frame.to_csv(manifest, index=False)
        nodes[node] = {"manifest": str(manifest), "site-id": f"S{node}", "device": "cpu"}
    return _run(root, _image_schema(), nodes, fusion="attention"), root / "site1" / "manifest.csv"


def _reference(run_dir: Path, manifest_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(raw inputs, PyTorch outputs) on the site's test rows through the site's own pipeline."""
    loaded = load_global_model(run_dir / "model.pt")
    manifest = load_manifest(manifest_path, loaded.schema, check_images=False, allow_single_class=True)
    rows = manifest.rows("test")
    data = MultimodalDataset(manifest, Preprocessor.fit(manifest), "test")
    batch = default_collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        expected = {k: v.numpy() for k, v in loaded.model(batch).items()}
    return raw_inputs(manifest, rows, {m: batch[m] for m in loaded.schema.image_specs}, batch["mask"]), expected


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_survival_export_reproduces_the_site_predictions(survival_run: Path, tmp_path: Path, fmt: str) -> None:
    result = export_run(survival_run, fmt, tmp_path / f"model.{fmt}", site="B")
    assert result.rows_checked == 6 and result.max_abs_diff <= 1e-5

    raw, expected = _reference(survival_run, survival_run.parent / "data" / "site-B.csv")
    assert np.isnan(raw["clinical_num"]).any() and (raw["clinical_cat"] == -1).any()  # missing values go in raw
    meta = read_metadata(result.path)
    assert [i["name"] for i in meta["inputs"]] == ["clinical_num", "clinical_cat", "omics", "mask"]
    got = run_export(result.path, fmt, [raw[i["key"]] for i in meta["inputs"]])
    assert [o["name"] for o in meta["outputs"]] == ["risk"]
    np.testing.assert_allclose(got[0], expected["risk"], rtol=0, atol=1e-5)
    assert np.ptp(expected["risk"]) > 1e-3  # a model that tells cases apart, not a constant

    # the embedded statistics are site B's own training rows', and differ from site A's
    manifest_b = load_manifest(survival_run.parent / "data" / "site-B.csv", _survival_schema(), check_images=False)
    pre_b = Preprocessor.fit(manifest_b)
    assert meta["statistics"]["omics_mean"] == pytest.approx(pre_b.omics_mean.tolist())
    assert meta["statistics_of"] == "B" and meta["categorical_levels"] == {"grade": ["G1", "G2", "G3"]}
    assert meta["selected_round"] == 1 and json.loads(result.sidecar.read_text()) == meta


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_image_export_with_missing_images_matches_and_keeps_a_dynamic_batch(
        image_run: tuple[Path, Path], tmp_path: Path, fmt: str) -> None:
    run_dir, manifest = image_run
    assert main(["export", str(run_dir), "--format", fmt, "--manifest", str(manifest),
                 "--out", str(tmp_path / "m")]) == 0

    raw, expected = _reference(run_dir, manifest)
    assert not raw["mask"][:, 0].all() and raw["mask"][:, 0].any()  # rows with and without an image
    meta = read_metadata(tmp_path / "m")
    assert [i["name"] for i in meta["inputs"]] == ["image", "clinical_num", "mask"]
    inputs = [raw[i["key"]] for i in meta["inputs"]]
    got = dict(zip([o["name"] for o in meta["outputs"]], run_export(tmp_path / "m", fmt, inputs), strict=True))
    assert set(got) == {"logits", "modality_weights"}
    for key, value in got.items():
        np.testing.assert_allclose(value, expected[key], rtol=0, atol=1e-5)
    one = run_export(tmp_path / "m", fmt, [x[:1] for x in inputs])  # batch size 1: not frozen at trace time
    np.testing.assert_allclose(one[0], expected["logits"][:1], rtol=0, atol=1e-5)


def test_wrapper_standardises_exactly_like_the_site(image_run: tuple[Path, Path]) -> None:
    """The graph's batch is the data loader's, bit for bit: NaN -> 0 + flag, -1 / unknown levels -> 0."""
    run_dir, manifest_path = image_run
    loaded = load_global_model(run_dir / "model.pt")
    manifest = load_manifest(manifest_path, loaded.schema, check_images=False)
    pre = Preprocessor.fit(manifest)
    wrapper = ExportableModel(loaded.model, loaded.schema, clinical_mean=pre.clinical_mean,
                              clinical_std=pre.clinical_std, omics_mean=pre.omics_mean, omics_std=pre.omics_std)
    rows = manifest.rows(None)
    data = MultimodalDataset(manifest, pre, rows=rows)
    batch = default_collate([data[i] for i in range(len(data))])
    raw = raw_inputs(manifest, rows, {"image": batch["image"]}, batch["mask"])
    raw["clinical_num"][0, 0] = np.nan
    built = wrapper.batch(*(torch.from_numpy(raw[i.key]) for i in wrapper.inputs))
    assert torch.equal(built["clinical_num"][1:], batch["clinical_num"][1:])
    assert built["clinical_num"][0].tolist() == [0.0, 1.0]  # missing: value 0, flag 1


def test_federated_run_needs_a_site_and_a_folder_needs_model_pt(survival_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExportError, match=r"pass --site \(A, B\) or --manifest"):
        export_run(survival_run, "torchscript")
    with pytest.raises(ExportError, match="'C' is not a site of this run"):
        export_run(survival_run, "torchscript", site="C")
    assert main(["export", str(tmp_path), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no model.pt" in err and "\n" not in err


def test_missing_onnx_extra_is_one_line_exit_2(survival_run: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["export", str(survival_run), "--site", "A"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --format onnx needs onnxruntime: pip install 'fedfusion[export]' "
                   "(or use --format torchscript, which needs nothing extra)")
    assert not (survival_run / "export").exists()


def test_train_local_model_carries_its_own_statistics(survival_run: Path, tmp_path: Path) -> None:
    """A train-local model.pt stores the statistics it trained with: no site is needed to export it."""
    payload = torch.load(survival_run / "model.pt", weights_only=True)
    manifest = load_manifest(survival_run.parent / "data" / "site-A.csv", _survival_schema(), check_images=False)
    pre = Preprocessor.fit(manifest)
    local = tmp_path / "local"
    local.mkdir()
    torch.save({"state_dict": payload["state_dict"], "schema": payload["schema"],
                "model_config": {"fusion": "concat"}, "preprocessor": pre.to_dict()}, local / "model.pt")
    result = export_run(local, "torchscript")
    assert result.site == "train-local" and result.path == local / "export" / "model-train-local.torchscript.pt"
    assert read_metadata(result.path)["statistics"]["clinical_std"] == pytest.approx(pre.clinical_std.tolist())

