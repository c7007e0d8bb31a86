"""The Grad-CAM of an image model trained on wdbc-multimodal's rendered nuclei lies on the nucleus.

The renderer moves each nucleus's area centroid onto the image centre and draws it dark (grey ~90)
on a light background (~205), so the nucleus of every test case is recovered exactly from its PNG
(darker than the midpoint grey, holes filled). A cnn_small image-only model is trained briefly on
the real WDBC labels (seed 0 split) and every test case's map for the positive class ('malignant':
where the evidence for disease is) is compared with that case's nucleus:

- its centre of mass lies inside the nucleus in (nearly) every case and within 3 px of the
  nucleus centre in the median case (nuclei have an equivalent radius of ~8-25 px);
- the map's mass inside the nucleus is several times the nucleus's share of the frame (a map
  spread evenly would have ratio 1; one on the background, below 1).

It also pins the bug this found: stretching the 8x8 map over the 64x64 frame (``F.interpolate``)
put every map ~3.5 px right of and below the evidence, because cnn_small's padded stride-2
convolutions centre cell i on pixel 8 i, not 8 i + 3.5 (``gradcam.trace_cell_grid``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_fill_holes, label
from sklearn.metrics import roc_auc_score

from fedfusion.common.config import ModelConfig, TrainConfig, load_schema
from fedfusion.common.data import MultimodalDataset
from fedfusion.common.manifest import load_manifest
from fedfusion.simulations import gradcam
from fedfusion.simulations.datasets import build_dataset
from fedfusion.simulations.explain import split_tensors
from fedfusion.simulations.gradcam import cam_centroid, find_target_layer, grad_cam
from fedfusion.simulations.local_training import run_local_training
from fedfusion.simulations.rendering import BACKGROUND_GREY, NUCLEUS_GREY

pytestmark = pytest.mark.integration

MALIGNANT = 1  # schema classes are ("benign", "malignant")


def nucleus_mask(png: Path) -> np.ndarray:
    """The rendered nucleus: the largest dark component of the PNG, holes (bright chromatin) filled."""
    grey = np.asarray(Image.open(png), dtype=np.float64)
    dark = grey < (NUCLEUS_GREY + BACKGROUND_GREY) / 2
    parts, count = label(dark)
    largest = np.argmax(np.bincount(parts.ravel())[1:]) + 1 if count else 0
    return binary_fill_holes(parts == largest)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An image-only cnn_small model on wdbc-multimodal (seed 0), its test tensors and nucleus masks."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("wdbc")
    schema = load_schema(build_dataset("wdbc-multimodal", folder, seed=0)).with_modalities(("image",))
    manifest = load_manifest(folder / "manifest.csv", schema)
    result = run_local_training(manifest, ModelConfig(fusion="concat"),
                                TrainConfig(epochs=12, batch_size=32, lr=3e-3, seed=0, patience=12,
                                            device="cpu", augment=False))
    test = MultimodalDataset(manifest, result.preprocessor, "test")
    tensors = split_tensors(test)
    images = manifest.frame["image"].iloc[list(test.rows)]
    masks = np.stack([nucleus_mask(folder / str(path)) for path in images])
    return {"model": result.model, "tensors": tensors, "masks": masks}


def _maps(trained: dict) -> tuple[np.ndarray, np.ndarray]:
    model = trained["model"]
    _, layer = find_target_layer(model.encoders["image"].backbone, 1, (64, 64))
    cams, explained = grad_cam(model, trained["tensors"], layer, target=MALIGNANT)
    assert (explained == MALIGNANT).all()
    keep = cams.reshape(len(cams), -1).sum(axis=1) > 0  # an all-zero map: no evidence for 'malignant' at all
    return cams, keep


def _offsets(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(x, y) of each map's centre of mass minus its nucleus's centroid, pixels."""
    out = []
    for cam, mask in zip(cams, masks, strict=True):
        ys, xs = np.nonzero(mask)
        cx, cy = cam_centroid(cam)
        out.append((cx - xs.mean(), cy - ys.mean()))
    return np.array(out)


def test_the_model_learned_and_nuclei_are_rendered_at_the_centre(trained: dict) -> None:
    model, tensors, masks = trained["model"], trained["tensors"], trained["masks"]
    with torch.no_grad():
        p = torch.softmax(model(tensors)["logits"], dim=1)[:, MALIGNANT].numpy()
    assert roc_auc_score(tensors["label"].numpy(), p) >= 0.85
    centres = np.array([(xs.mean(), ys.mean()) for ys, xs in (np.nonzero(m) for m in masks)])
    np.testing.assert_allclose(centres, 31.5, atol=1.0)  # the renderer's area centroid, after anti-aliasing
    fraction = masks.reshape(len(masks), -1).mean(axis=1)
    assert 0.03 < fraction.min() and fraction.max() < 0.6


def test_grad_cam_is_centred_on_the_rendered_nucleus(trained: dict) -> None:
    masks = trained["masks"]
    cams, keep = _maps(trained)
    assert keep.mean() >= 0.9, "most test cases must carry some evidence for 'malignant'"
    cams, masks = cams[keep], masks[keep]

    offsets = _offsets(cams, masks)
    distance = np.hypot(offsets[:, 0], offsets[:, 1])
    centroids = [cam_centroid(cam) for cam in cams]
    inside = np.array([m[round(cy), round(cx)] for m, (cx, cy) in zip(masks, centroids, strict=True)])
    radius = np.sqrt(masks.reshape(len(masks), -1).sum(axis=1) / np.pi)
    assert inside.mean() >= 0.95, "the map's centre of mass must lie on the nucleus"
    assert np.median(distance) <= 3.0
    assert np.all(distance <= 0.6 * radius)
    assert np.all(np.abs(offsets.mean(axis=0)) <= 1.5), f"systematic shift {offsets.mean(axis=0)} px"

    mass_inside = np.array([cam[mask].sum() / cam.sum() for cam, mask in zip(cams, masks, strict=True)])
    area = masks.reshape(len(masks), -1).mean(axis=1)
    ratio = mass_inside / area
    assert mass_inside.mean() >= 0.5, "most of the map's mass must lie on the nucleus"
    assert ratio.mean() >= 4.0 and np.mean(ratio > 1.5) >= 0.95


def test_stretching_the_feature_map_over_the_frame_shifted_it_right_and_down(
        trained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    cams, keep = _maps(trained)
    traced = _offsets(cams[keep], trained["masks"][keep])
    monkeypatch.setattr(gradcam, "trace_cell_grid", lambda *args, **kwargs: None)  # the old layout: F.interpolate's
    cams, _ = _maps(trained)
    stretched = _offsets(cams[keep], trained["masks"][keep])

    shift = stretched.mean(axis=0) - traced.mean(axis=0)
    np.testing.assert_allclose(shift, 3.5, atol=0.5)  # (8 - 1) / 2 px, as the geometry says
