"""3-D volumes: the cnn3d_small encoder (forward, Opacus DP step, every fusion), NIfTI and DICOM
series readers on the files nibabel and pydicom ship, and local training on a manifest of volumes."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from fedfusion.common.config import ClinicalColumn, ConfigError, ImageSpec, ModelConfig, Schema, TrainConfig
from fedfusion.common.imaging import ImageReadError
from fedfusion.common.manifest import load_manifest
from fedfusion.common.models import create_model, list_fusions
from fedfusion.common.volumes import load_volume_tensor, read_dicom_series, read_volume_any, to_tensor_volume
from tests.unit.common.models.conftest import random_batch
from tests.unit.common.models.test_models_dp import _one_private_step

VOLUME = ImageSpec(size=(16, 16), channels=1, depth=8)
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
DICOM_SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"


@pytest.fixture
def volume_schema(schema) -> Schema:
    return dataclasses.replace(schema, image=VOLUME)


def volume_batch(schema: Schema, batch_size: int = 4, present=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """conftest's random batch with the image replaced by (B, C, D, H, W) volumes (zeros when absent)."""
    batch = random_batch(schema, batch_size, present, seed)
    keep = batch["mask"][:, 0].float().view(-1, 1, 1, 1, 1)
    g = torch.Generator().manual_seed(seed + 1)
    batch["image"] = torch.randn(batch_size, *schema.image.shape, generator=g) * keep
    return batch


def test_cnn3d_encodes_volumes_forward_and_backward(volume_schema):
    model = create_model(volume_schema, ModelConfig(image_backbone="cnn3d_small", fusion="attention"))
    batch = volume_batch(volume_schema, present=(True, False, True))
    out = model(batch)
    out["logits"].sum().backward()
    assert out["logits"].shape == (4, 2) and torch.isfinite(out["risk"]).all()
    assert model.encoders["image"].backbone.features[0].weight.grad is not None
    with pytest.raises(ValueError, match=r"expects \(B, 1, 8, 16, 16\)"):
        model(random_batch(volume_schema))  # 2-D images for a volume schema


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
@pytest.mark.parametrize("fusion", list_fusions())
def test_private_step_on_volumes_for_every_fusion(volume_schema, fusion):
    """One real Opacus DP-SGD step (hooks): per-sample gradients for every parameter, all move."""
    _one_private_step(volume_schema, ModelConfig(fusion=fusion, image_backbone="cnn3d_small"), volume_batch)


def test_2d_backbone_with_volume_schema_is_a_config_error(volume_schema):
    with pytest.raises(ConfigError, match="'cnn_small' encodes 2-D images.*cnn3d_small"):
        create_model(volume_schema, ModelConfig(image_backbone="cnn_small"))


def test_schema_round_trips_depth(volume_schema):
    assert Schema.from_dict(volume_schema.to_dict()).image == VOLUME
    assert "depth" not in dataclasses.replace(volume_schema, image=ImageSpec()).to_dict()["image"]


def test_nibabel_anatomical_volume_reads_and_resizes():
    path = NIBABEL_DATA / "anatomical.nii"
    raw = np.asarray(nib.load(path).get_fdata())
    volume = read_volume_any(path)
    assert sorted(volume.shape) == sorted(raw.shape) and volume.shape[0] == raw.shape[2]  # axial slices first
    assert volume.min() == pytest.approx(raw.min()) and volume.max() == pytest.approx(raw.max())

    tensor = load_volume_tensor(path, depth=12, size=(20, 24), channels=3)
    assert tensor.shape == (3, 12, 20, 24) and tensor.dtype == torch.float32
    assert float(tensor.min()) == 0.0 and float(tensor.max()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(tensor[0], tensor[2])


def test_dicom_series_folder_is_stacked_in_anatomical_order(tmp_path):
    """pydicom's CT series (4 slices): files renamed so name order is the reverse of slice order."""
    files = sorted((DICOM_SERIES / "77654033" / "CT2").iterdir())
    datasets = [pydicom.dcmread(f) for f in files]
    by_z = sorted(range(len(files)), key=lambda i: float(datasets[i].ImagePositionPatient[2]))
    for rank, i in enumerate(reversed(by_z)):
        shutil.copy(files[i], tmp_path / f"IM{rank:04d}")
    (tmp_path / "README.txt").write_text("not DICOM")

    volume = read_dicom_series(tmp_path)

    expected = np.stack([apply_modality_lut(datasets[i].pixel_array, datasets[i]) for i in by_z])
    np.testing.assert_allclose(volume, expected)
    assert load_volume_tensor(tmp_path, depth=4, size=(16, 16)).shape == (1, 4, 16, 16)


def test_oblique_dicom_series_and_single_slice_files():
    volume = read_volume_any(DICOM_SERIES / "98892003" / "MR700")
    assert volume.shape == (7, 16, 16)
    single = read_volume_any(get_testdata_file("CT_small.dcm"))
    assert single.shape == (1, 128, 128)
    assert to_tensor_volume(single, depth=4, size=(32, 32)).shape == (1, 4, 32, 32)


def test_unusable_series_folders_are_clear_errors(tmp_path):
    with pytest.raises(ImageReadError, match="no DICOM slices"):
        read_dicom_series(tmp_path)
    shutil.copy(DICOM_SERIES / "77654033" / "CT2" / "17106", tmp_path / "a")
    shutil.copy(DICOM_SERIES / "98892003" / "MR700" / "4467", tmp_path / "b")
    with pytest.raises(ImageReadError, match="holds 2 DICOM series"):
        read_dicom_series(tmp_path)


def _volume_site(folder: Path, n: int = 24) -> Path:
    """NIfTI volumes (.nii.gz) where the label sets the size of a bright sphere, plus an age column."""
    rng = np.random.default_rng(0)
    (folder / "vol").mkdir(parents=True)
    rows = []
    zz, yy, xx = np.mgrid[:10, :12, :12]
    for i in range(n):
        y = i % 2
        data = rng.normal(100, 10, (12, 12, 10)).astype(np.float32)  # (x, y, z) as NIfTI stores it
        sphere = (zz - 5) ** 2 + (yy - 6) ** 2 + (xx - 6) ** 2 < (2 + 2 * y) ** 2
        data[np.transpose(sphere, (2, 1, 0))] += 300
        name = f"vol/case{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), folder / name)
        rows.append({"case_id": f"V{i:02d}", "split": "test" if i % 6 < 2 else "train",
                     "label": "malignant" if y else "benign", "image": name,
                     "age": round(float(rng.normal(60, 5)), 1)})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


@pytest.mark.filterwarnings("ignore:No artists with labels:UserWarning")  # the ROC plot of a tiny test split
def test_manifest_of_nifti_volumes_trains_end_to_end(tmp_path):
    from fedfusion.simulations.local_training import run_local_training

    schema = Schema(name="vol", task="classification", classes=("benign", "malignant"),
                    clinical=(ClinicalColumn("age"),), image=ImageSpec(size=(12, 12), depth=8))
    manifest = load_manifest(_volume_site(tmp_path), schema, check_images=True)
    torch.set_num_threads(1)

    result = run_local_training(manifest, ModelConfig(image_backbone="cnn3d_small", fusion="concat"),
                                TrainConfig(epochs=2, batch_size=8, device="cpu", lr_schedule="cosine",
                                            optimizer="sgd"), out_dir=tmp_path / "out")

    assert len(result.history) == 2 and np.isfinite(result.history[-1]["train_loss"])
    assert 0.0 <= result.test["auc"] <= 1.0
    assert (tmp_path / "out" / "model.pt").is_file()
