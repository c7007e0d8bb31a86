"""Explanations of a global model: permutation importance finds the planted signal, Grad-CAM maps
are image-shaped and non-negative, modality weights sum to 1, and ``fedfusion explain`` writes the
weight table and a Grad-CAM PNG per site for a run folder laid out as the server leaves it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedfusion.cli import main
from fedfusion.common.config import ClinicalColumn, ImageSpec, ModelConfig, Schema, TrainConfig
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.manifest import load_manifest
from fedfusion.common.models import create_model
from fedfusion.simulations.explain import (
    ExplainError,
    explain_run,
    modality_weights,
    permutation_importance,
    split_tensors,
)
from fedfusion.simulations.gradcam import (
    CellGrid,
    cam_to_pixels,
    find_target_layer,
    grad_cam,
    stretched_grid,
    trace_cell_grid,
)
from fedfusion.simulations.local_training import run_local_training
from tests.sitegen import make_site


def _signal_and_noise(folder: Path, n: int = 240, seed: int = 0) -> Path:
    """A clinical table where ``signal`` separates the classes (d = 2) and ``noise`` does not."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    frame = pd.DataFrame({
        "case_id": [f"P{i:03d}" for i in range(n)],
        "split": np.where(np.arange(n) % 5 == 0, "test", np.where(np.arange(n) % 5 == 1, "val", "train")),
        "label": np.where(y == 1, "malignant", "benign"),
        "signal": np.round(rng.normal(2.0 * y, 1.0), 4),
        "noise": np.round(rng.normal(0.0, 1.0, n), 4),
    })
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def test_permutation_importance_ranks_the_planted_column_above_noise(tmp_path: Path) -> None:
    schema = Schema(name="planted", task="classification", classes=("benign", "malignant"),
                    clinical=(ClinicalColumn("signal"), ClinicalColumn("noise")))
    manifest = load_manifest(_signal_and_noise(tmp_path), schema, check_images=False)
    trained = run_local_training(manifest, ModelConfig(fusion="concat"),
                                 TrainConfig(epochs=25, batch_size=32, lr=3e-3, device="cpu", patience=25))
    tensors = split_tensors(MultimodalDataset(manifest, trained.preprocessor, "test"))

    rows = {r["feature"]: r for r in permutation_importance(trained.model, tensors, schema, n_repeats=5, seed=1)}

    assert rows["signal"]["baseline"] > 0.8
    assert rows["signal"]["importance_mean"] > 0.2
    assert rows["signal"]["importance_mean"] > rows["noise"]["importance_mean"] + 0.15
    assert abs(rows["noise"]["importance_mean"]) < 0.08
    whole = rows["*"]  # the whole clinical modality shuffled: at least as bad as losing the signal alone
    assert whole["modality"] == "clinical" and whole["importance_mean"] >= rows["signal"]["importance_mean"] - 0.05
    assert rows["signal"]["n_repeats"] == 5 and rows["signal"]["importance_sd"] >= 0


@pytest.fixture
def image_batch(site: Path, schema: Schema) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Schema]:
    """A briefly trained image-only cnn_small model and a test batch of blob images (32x32)."""
    image_only = schema.with_modalities(("image",))
    manifest = load_manifest(site, image_only, check_images=False)
    trained = run_local_training(manifest, ModelConfig(fusion="concat"),
                                 TrainConfig(epochs=3, batch_size=16, lr=3e-3, device="cpu", augment=False))
    return trained.model, split_tensors(MultimodalDataset(manifest, trained.preprocessor, "test")), image_only


def test_grad_cam_maps_are_image_shaped_non_negative_and_not_constant(image_batch: tuple) -> None:
    model, batch, schema = image_batch
    name, layer = find_target_layer(model.encoders["image"].backbone, 1, (32, 32))

    cams, targets = grad_cam(model, batch, layer)

    assert name == "features.9"  # the last conv stage of cnn_small
    assert cams.shape == (len(batch["mask"]), 32, 32) and targets.shape == (len(batch["mask"]),)
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    assert all(cam.std() > 1e-4 and cam.max() == pytest.approx(1.0) for cam in cams)
    assert all(p.grad is None for p in model.parameters())  # gradients cleaned up


def test_grad_cam_finds_a_timm_cnn_layer_and_skips_vision_transformers() -> None:
    image = ImageSpec(size=(64, 64), channels=1)
    schema = Schema(name="img", task="classification", classes=("a", "b"), image=image)
    model = create_model(schema, ModelConfig(fusion="concat", image_backbone="resnet18"))
    batch = {"image": torch.rand(2, 1, 64, 64), "mask": torch.ones(2, 1, dtype=torch.bool),
             "label": torch.tensor([0, 1])}

    name, layer = find_target_layer(model.encoders["image"].backbone, 1, (64, 64))
    cams, _ = grad_cam(model, batch, layer)

    assert name == "layer4.1.conv2" and cams.shape == (2, 64, 64) and cams.min() >= 0
    vit = create_model(Schema(name="vit", task="classification", classes=("a", "b"),
                              image=ImageSpec(size=(32, 32), channels=1)),
                       ModelConfig(fusion="concat", image_backbone="vit_tiny_patch16_224"))
    assert find_target_layer(vit.encoders["image"].backbone, 1, (32, 32)) is None


def _traced(backbone: torch.nn.Module, layer: torch.nn.Module, size: int = 64) -> CellGrid | None:
    image = torch.rand(2, 1, size, size)
    return trace_cell_grid(backbone, image, layer, lambda: backbone(image))


def test_cell_grid_follows_each_layers_padding_and_stride() -> None:
    # cnn_small: 3x3 convs padded by 1, stride 2 in the last three -> cell i centred on pixel 8 i
    small = create_model(Schema(name="img", task="classification", classes=("a", "b"),
                                image=ImageSpec(size=(64, 64), channels=1)), ModelConfig(fusion="concat"))
    backbone = small.encoders["image"].backbone
    assert _traced(backbone, find_target_layer(backbone, 1, (64, 64))[1]) == CellGrid((8.0, 8.0), (0.0, 0.0))
    # unpadded: a 3x3 stride-2 conv centres cell i on 2 i + 1; a 2x2 max-pool then on 4 i + 1 + 1
    conv, pool = torch.nn.Conv2d(1, 2, 3, stride=2), torch.nn.MaxPool2d(2)
    assert _traced(torch.nn.Sequential(conv, pool), pool) == CellGrid((4.0, 4.0), (2.0, 2.0))
    # ResNet: the strided 1x1 shortcut runs on the block's input and is not followed
    resnet = create_model(Schema(name="img", task="classification", classes=("a", "b"),
                                 image=ImageSpec(size=(64, 64), channels=1)),
                          ModelConfig(fusion="concat", image_backbone="resnet18")).encoders["image"].backbone
    assert _traced(resnet, find_target_layer(resnet, 1, (64, 64))[1]) == CellGrid((32.0, 32.0), (0.0, 0.0))
    # a layer the forward pass never reaches along the chain: no grid, callers stretch
    assert _traced(torch.nn.Sequential(conv), torch.nn.Conv2d(2, 2, 3)) is None


def test_cam_to_pixels_puts_a_cell_on_its_centre_where_stretching_missed_it_by_half_a_cell() -> None:
    cam = torch.zeros(1, 1, 8, 8)
    cam[0, 0, 3, 5] = 1.0  # row 3, column 5: centred on pixel (y, x) = (24, 40) for cnn_small

    placed = cam_to_pixels(cam, (64, 64), CellGrid((8.0, 8.0), (0.0, 0.0)))[0]
    stretched = cam_to_pixels(cam, (64, 64), stretched_grid((64, 64), (8, 8)))[0]

    assert placed.shape == (64, 64)
    assert np.unravel_index(int(placed.argmax()), placed.shape) == (24, 40) and float(placed[24, 40]) == 1.0
    assert float(placed[28, 44]) == pytest.approx(0.25)  # bilinear between cell centres
    # the stretched layout equals F.interpolate(align_corners=False): its peak sits 3.5 px further on
    expected = torch.nn.functional.interpolate(cam, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(stretched, expected, atol=1e-6, rtol=0)
    ys, xs = np.nonzero((stretched == stretched.max()).numpy())
    assert (ys.mean(), xs.mean()) == (27.5, 43.5)


def test_grad_cam_explains_the_class_asked_for(image_batch: tuple) -> None:
    model, batch, _ = image_batch
    _, layer = find_target_layer(model.encoders["image"].backbone, 1, (32, 32))
    _, predicted = grad_cam(model, batch, layer)
    with torch.no_grad():
        assert (predicted == model(batch)["logits"].argmax(dim=1).numpy()).all()
    _, fixed = grad_cam(model, batch, layer, target=1)
    assert (fixed == 1).all()


@pytest.mark.parametrize("fusion", ["attention", "gated", "late"])
def test_modality_weights_sum_to_one_and_absent_modalities_get_none(fusion: str, site: Path, schema: Schema) -> None:
    manifest = load_manifest(site, schema, check_images=False)
    tensors = split_tensors(MultimodalDataset(manifest, Preprocessor.fit(manifest), None))
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion=fusion)).eval()
    tensors["mask"][::3, schema.modalities.index("omics")] = False

    weights = modality_weights(model, tensors, schema)

    assert weights.shape == (len(tensors["mask"]), len(schema.modalities))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    assert (weights[~tensors["mask"].numpy()] == 0).all() and (weights >= 0).all()
    assert modality_weights(create_model(schema, ModelConfig(fusion="concat")).eval(), tensors, schema) is None


# ----------------------------------------------------------------------------------- the command


@pytest.fixture
def run_dir(tmp_path: Path, schema: Schema) -> Path:
    """A simulate-style folder: data/site-*.csv (+ images, schema) and federated/model.pt as the server
    writes it (state_dict, schema, run_config), from an untrained attention model."""
    data = tmp_path / "run" / "data"
    (data / "images").mkdir(parents=True)
    for k, name in enumerate(("A", "B")):
        path = make_site(tmp_path / f"tmp{name}", n=20, seed=k)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for image in frame["image"]:
            (data / "images" / f"{name}-{Path(image).name}").write_bytes((path.parent / image).read_bytes())
        frame["image"] = [f"images/{name}-{Path(i).name}" for i in frame["image"]]
        frame["case_id"] = name + frame["case_id"]
        frame.to_csv(data / f"site-{name}.csv", index=False)
    schema.save(data / "schema.json")
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion="attention"))
    (tmp_path / "run" / "federated").mkdir()
    torch.save({"state_dict": model.state_dict(), "schema": schema.to_dict(),
                "run_config": {"fusion": "attention", "sites": "A,B", "data-dir": "/moved/away",
                               "schema": str(data / "schema.json")}}, tmp_path / "run" / "federated" / "model.pt")
    return tmp_path / "run"


def test_explain_writes_the_weight_table_and_a_grad_cam_per_site(run_dir: Path, schema: Schema) -> None:
    report = explain_run(run_dir, n_cases=2, n_repeats=2)

    out = report.parent
    assert out == run_dir / "explain"
    with (out / "modality_weights.csv").open() as handle:
        weights = list(csv.DictReader(handle))
    assert [r["site"] for r in weights] == ["A", "B", "all sites"]
    for row in weights:
        assert sum(float(row[f"weight_{m}"]) for m in schema.modalities) == pytest.approx(1.0, abs=1e-5)
    pngs = sorted(p.name for p in (out / "gradcam").glob("*.png"))
    assert [p for p in pngs if p.startswith("site-A-")] and [p for p in pngs if p.startswith("site-B-")]
    with (out / "permutation_importance.csv").open() as handle:
        importance = list(csv.DictReader(handle))
    assert {r["feature"] for r in importance} >= {"age", "size_mm", "grade", "gene0", "*"}
    assert {r["site"] for r in importance} == {"A", "B", "all sites"}
    text = report.read_text()
    assert "## Modality weights" in text and "## Grad-CAM" in text and "## Permutation importance" in text
    assert (out / "modality_weights.png").exists() and (out / "permutation_importance.png").exists()


def test_cli_explain_runs_and_reports_a_folder_without_a_model(run_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["explain", str(run_dir), "--out", str(tmp_path / "x"), "--cases", "1", "--repeats", "1",
                 "--max-features", "2"]) == 0
    captured = capsys.readouterr()
    assert "Modality weights" in captured.out
    # stderr is not a terminal here: one plain line per step, in order, no ANSI bar
    lines = [line for line in captured.err.splitlines() if line.startswith("explain: ")]
    expected = ["explain: loading the model", "explain: modality weights", "explain: Grad-CAM image site 1/2 A",
                "explain: Grad-CAM image site 2/2 B", "explain: screening omics features",
                "explain: permutation importance site A (1/2) feature 1/", "explain: permutation importance site B (2/2)"]
    positions = [next(i for i, line in enumerate(lines) if line.startswith(text)) for text in expected]
    assert positions == sorted(positions)
    total = 2 + 1 + 2 + 3  # 2 numeric, 1 categorical, the 2 screened genes, then each whole modality (schema fixture)
    assert f"explain: permutation importance site B (2/2) feature {total}/{total}" in captured.err
    assert "\x1b[" not in captured.err
    with (tmp_path / "x" / "permutation_importance.csv").open() as handle:
        genes = {r["feature"] for r in csv.DictReader(handle) if r["modality"] == "omics" and r["feature"] != "*"}
    assert len(genes) == 2  # 6 genes screened down to the 2 with the largest |gradient x input|
    assert "6 omics features: the 2 with the largest" in (tmp_path / "x" / "explain.md").read_text()

    assert main(["explain", str(tmp_path / "nowhere")]) == 2
    assert "no model.pt" in capsys.readouterr().err
    with pytest.raises(ExplainError, match="no model.pt"):
        explain_run(tmp_path / "nowhere")
