"""Readers on real files that pydicom, nibabel and scikit-image ship; transforms on their pixels."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import nibabel.testing
import numpy as np
import pydicom
import pytest
import skimage.data
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from fedfusion.common.imaging import (
    SUPPORTED_SUFFIXES,
    ImageReadError,
    augment,
    load_image_tensor,
    read_image,
    read_volume,
    to_tensor_image,
)

NIFTI_DIR = Path(nibabel.testing.data_path)
ANATOMICAL = NIFTI_DIR / "anatomical.nii"


def _dicom(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None and os.path.isfile(path), f"pydicom no longer ships {name}"
    return Path(path)


def _minmax(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    return (array - array.min()) / (array.max() - array.min())


def _error(path: Path, **kwargs: object) -> str:
    with pytest.raises(ImageReadError) as caught:
        read_image(path, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert str(path) in message
    return message


# ------------------------------------------------------------------------------------------ DICOM


def test_ct_rescale_gives_hounsfield_units_like_pydicom() -> None:
    path = _dicom("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.dtype == np.float32 and image.shape == (128, 128)
    # CT_small has RescaleIntercept -1024 and no stored window, so nothing is clipped.
    np.testing.assert_array_equal(image, apply_modality_lut(ds.pixel_array, ds))
    assert image.min() == -896.0 and image.max() == 1167.0
    assert image.min() < 0 < image.max()  # air/fat below water, bone above: Hounsfield range


def test_mr_stored_window_clips_in_scanner_units() -> None:
    path = _dicom("MR_small.dcm")
    ds = pydicom.dcmread(path)
    raw = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)

    auto = read_image(path)
    np.testing.assert_array_equal(auto, np.clip(raw, -200.0, 1400.0))
    assert auto.max() == 1400.0 and raw.max() == 2145.0
    np.testing.assert_array_equal(read_image(path, window=None), raw)
    np.testing.assert_array_equal(read_image(path, window=(300.0, 200.0)), np.clip(raw, 200.0, 400.0))
    # Same picture as pydicom's own VOI windowing, up to its output scaling.
    np.testing.assert_allclose(_minmax(auto), _minmax(apply_voi_lut(raw, ds)), atol=2e-3)


def test_dicom_without_suffix_is_recognised_by_its_marker(tmp_path: Path) -> None:
    target = tmp_path / "IM000001"
    shutil.copy(_dicom("MR_small.dcm"), target)
    np.testing.assert_array_equal(read_image(target), read_image(_dicom("MR_small.dcm")))


def test_multiframe_dicom_is_a_volume() -> None:
    path = _dicom("rtdose.dcm")
    ds = pydicom.dcmread(path)
    expected = apply_modality_lut(ds.pixel_array, ds)
    volume = read_volume(path)
    assert volume.shape == (15, 10, 10)
    np.testing.assert_allclose(volume, expected, rtol=1e-6)
    np.testing.assert_allclose(read_image(path), expected[7], rtol=1e-6)
    np.testing.assert_allclose(read_image(path, slice_index=2), expected[2], rtol=1e-6)


def test_colour_dicom_reads_as_rgb() -> None:
    path = _dicom("examples_rgb_color.dcm")
    image = read_image(path)
    assert image.shape == (240, 320, 3)
    np.testing.assert_array_equal(image, pydicom.dcmread(path).pixel_array)
    with pytest.raises(ImageReadError, match="greyscale"):
        read_volume(path)


def test_monochrome1_is_inverted_so_high_means_bright(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    original = read_image(_dicom("MR_small.dcm"), window=None)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "xray.dcm")
    inverted = read_image(tmp_path / "xray.dcm", window=None)
    np.testing.assert_array_equal(inverted, original.max() + original.min() - original)


def test_invalid_stored_window_names_the_override(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    ds.WindowWidth = 0
    ds.save_as(tmp_path / "bad_window.dcm")
    message = _error(tmp_path / "bad_window.dcm")
    assert "positive width" in message and "window=None" in message
    assert read_image(tmp_path / "bad_window.dcm", window=None).max() == 2145.0


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MR_truncated.dcm", "pixel data cannot be decoded"),  # real file with cut-off pixel data
        ("test-SR.dcm", "no pixel data (Comprehensive SR Storage)"),  # a structured report
        ("rtstruct.dcm", "no pixel data (RT Structure Set Storage)"),  # no preamble, still identified
    ],
)
def test_dicom_without_usable_pixels_says_why(name: str, expected: str) -> None:
    assert expected in _error(_dicom(name))


def test_non_dicom_with_dcm_suffix(tmp_path: Path) -> None:
    path = tmp_path / "scan7.dcm"
    Image.fromarray(skimage.data.camera()).save(path, format="PNG")
    assert "not a readable DICOM file" in _error(path)


# ------------------------------------------------------------------------------------------ NIfTI


def test_nifti_volume_is_reoriented_to_axial_lps() -> None:
    assert ANATOMICAL.is_file(), f"nibabel no longer ships {ANATOMICAL}"
    img = nib.load(ANATOMICAL)
    data = img.get_fdata()
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S") and data.shape == (33, 41, 25)

    volume = read_volume(ANATOMICAL)
    # LAS -> LPS flips the second axis; then (x, y, z) -> (z, y, x).
    expected = data[:, ::-1, :].transpose(2, 1, 0)
    assert volume.shape == (25, 41, 33) and volume.dtype == np.float32
    np.testing.assert_array_equal(volume, expected)
    middle = read_image(ANATOMICAL)
    np.testing.assert_array_equal(middle, data[:, ::-1, 12].T)
    np.testing.assert_array_equal(read_image(ANATOMICAL, slice_index=3), data[:, ::-1, 3].T)


def test_same_anatomy_stored_as_ras_reads_identically(tmp_path: Path) -> None:
    canonical = nib.as_closest_canonical(nib.load(ANATOMICAL))
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    nib.save(canonical, tmp_path / "anatomical_ras.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "anatomical_ras.nii.gz"), read_volume(ANATOMICAL))


def test_synthetic_ras_nifti_index_mapping(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ras.nii")
    volume = read_volume(tmp_path / "ras.nii")
    assert volume.shape == (6, 5, 4)
    for k, r, c in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        assert volume[k, r, c] == data[3 - c, 4 - r, k]  # row 0 anterior, column 0 patient's right


def test_nifti_trailing_singleton_and_4d(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(6, 7, 5, 1)).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # already LPS
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "single.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "single.nii.gz"), data[..., 0].transpose(2, 1, 0))

    message = _error(NIFTI_DIR / "example4d.nii.gz")
    assert "image has shape (128, 96, 24, 2), expected a 2D image or a 3D volume" in message
    assert "out of range; the volume has 25 slice(s)" in _error(ANATOMICAL, slice_index=25)


def test_corrupt_nifti(tmp_path: Path) -> None:
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(np.random.default_rng(1).bytes(4000))
    assert "not a readable NIfTI file" in _error(path)


# ---------------------------------------------------------------------------------- PIL formats


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".TIFF", ".PNG"])
def test_lossless_grey_round_trip(tmp_path: Path, suffix: str) -> None:
    camera = skimage.data.camera()
    path = tmp_path / f"camera{suffix}"
    Image.fromarray(camera).save(path)
    image = read_image(path)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, camera)


def test_colour_png_and_jpeg(tmp_path: Path) -> None:
    ihc = skimage.data.immunohistochemistry()
    Image.fromarray(ihc).save(tmp_path / "ihc.png")
    Image.fromarray(ihc).save(tmp_path / "ihc.jpg", quality=95)
    np.testing.assert_array_equal(read_image(tmp_path / "ihc.png"), ihc)
    jpeg = read_image(tmp_path / "ihc.jpg")
    assert jpeg.shape == (512, 512, 3)
    assert np.abs(jpeg - ihc).mean() < 3.0  # lossy, but the same picture


def test_alpha_dropped_and_16_bit_kept(tmp_path: Path) -> None:
    rgba = np.dstack([skimage.data.immunohistochemistry(), np.full((512, 512), 7, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgba[..., :3])

    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png"), deep)


def test_truncated_png_and_text_as_jpeg(tmp_path: Path) -> None:
    Image.fromarray(skimage.data.camera()).save(tmp_path / "full.png")
    whole = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    assert "not a readable PNG image" in _error(tmp_path / "cut.png")
    (tmp_path / "note.jpg").write_text("patient refused imaging")
    assert "not a readable JPG image" in _error(tmp_path / "note.jpg")


# ---------------------------------------------------------------------------------------- .npy


def test_npy_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    grey, colour, volume = rng.normal(size=(9, 11)), rng.normal(size=(9, 11, 3)), rng.normal(size=(5, 9, 11))
    for name, array in {"grey": grey, "colour": colour, "volume": volume, "one": grey[..., None]}.items():
        np.save(tmp_path / f"{name}.npy", array)
    np.testing.assert_array_equal(read_image(tmp_path / "grey.npy"), grey.astype(np.float32))
    np.testing.assert_array_equal(read_image(tmp_path / "one.npy"), grey.astype(np.float32))
    np.testing.assert_array_equal(read_image(tmp_path / "colour.npy"), colour.astype(np.float32))
    np.testing.assert_array_equal(read_image(tmp_path / "volume.npy"), volume[2].astype(np.float32))
    np.testing.assert_array_equal(read_volume(tmp_path / "volume.npy"), volume.astype(np.float32))
    np.testing.assert_array_equal(read_volume(tmp_path / "grey.npy"), grey[None].astype(np.float32))


def test_npy_rejects_pickles_strings_and_4d(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "not a readable .npy array" in _error(tmp_path / "objects.npy")
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    assert "expected real numbers" in _error(tmp_path / "words.npy")
    np.save(tmp_path / "scan7.npy", np.zeros((3, 40, 40, 2)))
    assert "image has shape (3, 40, 40, 2), expected a 2D image" in _error(tmp_path / "scan7.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4)))
    assert "is empty" in _error(tmp_path / "empty.npy")


# ---------------------------------------------------------------------------------- dispatching


def test_unknown_suffix_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "scan.gif"
    Image.fromarray(skimage.data.camera()).save(path)
    message = _error(path)
    assert all(suffix in message for suffix in SUPPORTED_SUFFIXES)
    (tmp_path / "notes").write_text("no suffix, no DICOM marker")
    assert "no suffix" in _error(tmp_path / "notes")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "file not found" in _error(tmp_path / "nowhere" / "scan7.dcm")
    (tmp_path / "folder.png").mkdir()
    assert "expected an image file" in _error(tmp_path / "folder.png")


def test_bad_window_argument_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="positive width"):
        read_image(_dicom("CT_small.dcm"), window=(40.0, -400.0))


# -------------------------------------------------------------------------------------- tensors


def test_to_tensor_same_size_is_plain_min_max() -> None:
    camera = skimage.data.camera().astype(np.float32)
    tensor = to_tensor_image(camera, size=(512, 512), channels=1)
    assert tensor.shape == (1, 512, 512) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor[0].numpy(), _minmax(camera), atol=1e-6)


def test_to_tensor_channel_conversion_and_resize() -> None:
    ihc = skimage.data.immunohistochemistry().astype(np.float32)
    grey = to_tensor_image(ihc, size=(512, 512), channels=1)
    luma = ihc @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(grey[0].numpy(), _minmax(luma), atol=1e-5)

    rgb = to_tensor_image(skimage.data.camera(), size=(32, 48), channels=3)
    assert rgb.shape == (3, 32, 48)
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
    assert float(rgb.min()) == 0.0 and float(rgb.max()) == 1.0


def test_to_tensor_downsizing_matches_pil_antialiased_resize() -> None:
    # PIL's resize filters over the whole footprint of each output pixel; plain bilinear sampling
    # would alias the camera's grass texture (max error ~0.4 here).
    camera = skimage.data.camera().astype(np.float32)
    pil = np.asarray(Image.fromarray(camera, mode="F").resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(to_tensor_image(camera, size=(64, 64))[0].numpy(), _minmax(pil), atol=1e-5)


def test_to_tensor_is_finite_for_constant_and_nan_images() -> None:
    assert torch.count_nonzero(to_tensor_image(np.full((10, 10), 42.0), size=(4, 4), channels=3)) == 0
    with_nan = skimage.data.camera().astype(np.float32)
    with_nan[:10] = np.nan
    tensor = to_tensor_image(with_nan, size=(64, 64))
    assert torch.isfinite(tensor).all() and 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    with pytest.raises(ValueError, match="channels=2"):
        to_tensor_image(with_nan, size=(8, 8), channels=2)
    with pytest.raises(ValueError, match="expected \\(H, W\\) grey"):
        to_tensor_image(np.zeros((4, 4, 2)), size=(8, 8))


@pytest.mark.parametrize(
    ("source", "channels"),
    [(lambda tmp: _dicom("CT_small.dcm"), 1), (lambda tmp: ANATOMICAL, 3), (lambda tmp: tmp / "ihc.png", 3)],
    ids=["ct-dicom", "nifti", "ihc-png"],
)
def test_load_image_tensor_on_real_files(tmp_path: Path, source: object, channels: int) -> None:
    Image.fromarray(skimage.data.immunohistochemistry()).save(tmp_path / "ihc.png")
    tensor = load_image_tensor(source(tmp_path), size=(64, 64), channels=channels)  # type: ignore[operator]
    assert tensor.shape == (channels, 64, 64)
    assert torch.isfinite(tensor).all() and float(tensor.min()) == 0.0 and float(tensor.max()) == 1.0


# -------------------------------------------------------------------------------------- augment


def _ct_tensor() -> torch.Tensor:
    return load_image_tensor(_dicom("CT_small.dcm"), size=(48, 48), channels=3)


def test_augment_is_deterministic_per_seed() -> None:
    image = _ct_tensor()
    first = augment(image, torch.Generator().manual_seed(7))
    again = augment(image, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    outputs = {augment(image, torch.Generator().manual_seed(s)).sum().item() for s in range(8)}
    assert len(outputs) > 1


@pytest.mark.parametrize("shape", [(3, 48, 48), (1, 16, 24), (2, 7, 5)])
def test_augment_keeps_shape_range_and_input(shape: tuple[int, int, int]) -> None:
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    before = image.clone()
    for seed in range(20):
        out = augment(image, torch.Generator().manual_seed(seed))
        assert out.shape == image.shape and out.dtype == image.dtype
        assert float(out.min()) >= float(image.min()) and float(out.max()) <= float(image.max())
    assert torch.equal(image, before)


def test_augment_without_jitter_only_moves_pixels() -> None:
    image = _ct_tensor()
    for seed in range(8):
        out = augment(image, torch.Generator().manual_seed(seed), max_brightness=0.0, max_contrast=0.0)
        assert torch.allclose(out.flatten().sort().values, image.flatten().sort().values, atol=1e-6)


def test_augment_consumes_a_fixed_number_of_draws() -> None:
    square, wide = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    augment(torch.rand(1, 8, 8), square)
    augment(torch.rand(3, 8, 20), wide)
    assert torch.equal(square.get_state(), wide.get_state())
