"""3-D volumes for the 3-D image encoders: a file or a DICOM series in, a ``(C, D, H, W)`` tensor out.

CT and MRI arrive as NIfTI files from research pipelines, as one multi-frame DICOM, or (straight
from a PACS) as a folder holding one DICOM file per slice. A schema with ``image.depth`` > 0 asks for
volumes: every case becomes a ``(channels, depth, height, width)`` float32 tensor in ``[0, 1]``, so
sites with different slice counts and matrix sizes feed the model the same geometry.

Reading single files is :func:`fedfusion.common.imaging.read_volume`'s job (NIfTI reoriented to
LPS, ``.npy``, multi-frame DICOM); this module adds DICOM series (a folder) and the 3-D resize.
Errors are :class:`~fedfusion.common.imaging.ImageReadError` naming the file or folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedfusion.common.imaging import ImageReadError, Window, read_volume

_FLAT_TOLERANCE = 1e-5


def read_volume_any(path: str | Path, *, window: Window = "auto") -> np.ndarray:
    """A float32 ``(D, H, W)`` volume from a file (see ``read_volume``) or a folder of DICOM slices."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    return read_volume(path, window=window)


def read_dicom_series(folder: str | Path) -> np.ndarray:
    """Stack a folder's single-slice DICOM files into ``(D, H, W)`` in the files' units (HU for CT).

    Slices are ordered along the slice normal (``ImagePositionPatient`` projected on the cross
    product of ``ImageOrientationPatient``'s row and column directions), falling back to
    ``InstanceNumber``: file names from PACS exports say nothing about anatomy. Non-DICOM files
    (DICOMDIR, notes) are skipped; a folder mixing several series or matrix sizes is refused,
    because silently stacking a localiser with the axial series gives a meaningless volume.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    folder = Path(folder)
    slices: list[tuple[float, np.ndarray]] = []
    series: set[str] = set()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(file)
        except Exception:  # not DICOM (a README, DICOMDIR is read but has no pixels)  # noqa: BLE001
            continue
        if "PixelData" not in ds:
            continue
        try:
            pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
        except Exception as err:  # noqa: BLE001  (pydicom raises many types for undecodable pixels)
            raise ImageReadError(f"{file}: DICOM pixels cannot be decoded ({type(err).__name__}: {err})") from err
        if pixels.ndim != 2:
            raise ImageReadError(f"{file}: a DICOM series must hold one grey slice per file, got shape "
                                 f"{pixels.shape}")
        series.add(str(ds.get("SeriesInstanceUID", "")))
        slices.append((_slice_position(ds), pixels))
    if not slices:
        raise ImageReadError(f"{folder}: no DICOM slices with pixel data in this folder; expected one "
                             "DICOM file per slice of a single series")
    if len(series) > 1:
        raise ImageReadError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder")
    shapes = sorted({s.shape for _, s in slices})
    if len(shapes) > 1:
        raise ImageReadError(f"{folder}: slices have different sizes {shapes}; expected one series")
    slices.sort(key=lambda item: item[0])
    return np.stack([s for _, s in slices])


def _slice_position(ds: object) -> float:
    position = getattr(ds, "ImagePositionPatient", None)
    orientation = getattr(ds, "ImageOrientationPatient", None)
    if position is not None and orientation is not None and len(orientation) == 6:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        return float(np.dot(normal, np.asarray(position, float)))
    return float(getattr(ds, "InstanceNumber", 0) or 0)


def to_tensor_volume(volume: np.ndarray, depth: int, size: tuple[int, int], channels: int = 1) -> torch.Tensor:
    """``(channels, depth, H, W)`` float32 in ``[0, 1]`` from a ``(D, H, W)`` volume.

    Trilinear resampling to the schema's geometry (slice thickness differs between sites, so depth
    is resampled like height and width); intensities are min-max scaled over the whole volume (as
    ``to_tensor_image`` does per image, for the same reason: one bounded range whatever the units);
    non-finite voxels become the minimum; grey is repeated to 3 channels when asked.
    """
    if depth < 1 or len(size) != 2 or min(size) < 1:
        raise ValueError(f"volume geometry depth={depth}, size={size}; expected positive integers")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}; expected 1 (grey) or 3")
    data = np.asarray(volume, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"volume has shape {data.shape}; expected (D, H, W)")
    tensor = torch.from_numpy(np.ascontiguousarray(data))
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        fill = tensor[finite].min() if bool(finite.any()) else torch.tensor(0.0)
        tensor = torch.where(finite, tensor, fill)
    target = (depth, int(size[0]), int(size[1]))
    if tuple(tensor.shape) != target:
        tensor = F.interpolate(tensor[None, None], size=target, mode="trilinear", align_corners=False)[0, 0]
    low, high = float(tensor.min()), float(tensor.max())
    if high - low > _FLAT_TOLERANCE * max(1.0, abs(low), abs(high)):
        tensor = ((tensor - low) / (high - low)).clamp_(0.0, 1.0)
    else:
        tensor = torch.zeros_like(tensor)
    return tensor[None].expand(channels, -1, -1, -1).contiguous()


def load_volume_tensor(path: str | Path, depth: int, size: tuple[int, int], channels: int = 1, *,
                       window: Window = "auto") -> torch.Tensor:
    """:func:`read_volume_any` then :func:`to_tensor_volume`: the one call a Dataset needs per case."""
    return to_tensor_volume(read_volume_any(path, window=window), depth, size, channels)
