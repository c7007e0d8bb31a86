"""Image readers and transforms: one float32 array per file, one normalised tensor per sample.

Hospitals export images in whatever their PACS or research pipeline produces: PNG/JPEG
screenshots, DICOM straight from the scanner, NIfTI from a neuro pipeline, NumPy arrays from a
previous study. The model needs every site's images to arrive with the same geometry and the same
intensity range, so this module is the single place where files become tensors:

* :func:`read_image` / :func:`read_volume` turn a file into a float32 array in the file's own
  units (Hounsfield units for CT, scanner units for MR, 0-255 for 8-bit pictures) and raise
  :class:`ImageReadError` -- never a PIL/pydicom/nibabel traceback -- naming the file, what went
  wrong and what was expected, so ``fedfusion site check`` can tell a hospital engineer which
  export to redo.
* :func:`to_tensor_image` fixes channels, size and intensity range; :func:`augment` is the light
  train-time augmentation applied on top.

Array layouts: grey images are ``(H, W)``, colour images ``(H, W, 3)``, volumes ``(D, H, W)``
with ``D`` indexing axial slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz", ".npy"
)
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

Window: TypeAlias = "tuple[float, float] | None | Literal['auto']"
"""DICOM-style intensity window ``(center, width)`` in the image's units, ``None`` for no
windowing, or ``"auto"`` for the window stored in a DICOM file's WindowCenter/WindowWidth."""

# ITU-R 601-2 luma, the weights PIL uses for RGB -> "L", so a colour PNG converted here matches
# the same PNG converted to greyscale by any PIL-based export tool.
_LUMA = (0.299, 0.587, 0.114)
_FLAT_TOLERANCE = 1e-5


class ImageReadError(ValueError):
    """A site's image file cannot be turned into an image; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_image(
    path: str | Path,
    *,
    window: Window = "auto",
    slice_index: int | None = None,
) -> np.ndarray:
    """Read one 2-D image as float32: ``(H, W)`` for grey, ``(H, W, 3)`` for colour.

    The reader is chosen by suffix (see :data:`SUPPORTED_SUFFIXES`, case-insensitive); a file
    without any suffix is accepted when it carries the DICOM ``DICM`` marker, because PACS exports
    often name files ``IM000001``. Values stay in the file's units so that a caller can still
    reason about them (Hounsfield units for CT after RescaleSlope/RescaleIntercept); scaling to a
    common range is :func:`to_tensor_image`'s job.

    Volumes (NIfTI, multi-frame DICOM, 3-D ``.npy``) give one axial slice: ``slice_index`` along
    the first axis of :func:`read_volume`'s result, the middle slice by default. Alpha channels
    are dropped: transparency carries no clinical signal.

    ``window`` = ``(center, width)`` clips values to ``[center - width/2, center + width/2]``,
    keeping units (the linear part of a DICOM VOI window is the identity up to scale, and
    :func:`to_tensor_image` rescales anyway); ``"auto"`` uses the first WindowCenter/WindowWidth
    of a DICOM file when it has one and does nothing for other formats; ``None`` never windows.
    Clipping tames padding values (-2000 HU outside the scan field) and metal that would
    otherwise squash the tissue contrast into a sliver of the normalised range.
    """
    path = Path(path)
    array, is_volume = _read_any(path, window)
    if is_volume:
        array = _pick_slice(path, array, slice_index)
    elif slice_index not in (None, 0):
        raise ImageReadError(f"{path}: slice_index={slice_index} was given but the file is a single 2D image")
    return np.ascontiguousarray(array, dtype=np.float32)


def read_volume(path: str | Path, *, window: Window = "auto") -> np.ndarray:
    """Read a greyscale volume as float32 ``(D, H, W)``; a 2-D grey image gives ``D == 1``.

    NIfTI volumes are reoriented to DICOM's patient axes (LPS) whatever order the scanner or
    pipeline stored them in, then laid out as ``(superior, posterior, left)``: slice ``d`` is an
    axial slice seen the way radiologists view them (anterior at the top, the patient's right on
    the image's left). Without this, two sites exporting the same anatomy as RAS and LAS NIfTI
    would feed the model mirrored images. ``.npy`` volumes and multi-frame DICOM are taken as
    already ``(D, H, W)``. A single ``.dcm`` file holds one slice; series of files are not merged.
    """
    path = Path(path)
    array, is_volume = _read_any(path, window)
    if is_volume and array.ndim == 3:
        return np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 2:
        return np.ascontiguousarray(array[None], dtype=np.float32)
    raise ImageReadError(
        f"{path}: image has shape {tuple(array.shape)} (colour), expected a greyscale volume (D, H, W) "
        "or a greyscale 2D image"
    )


def _read_any(path: Path, window: Window) -> tuple[np.ndarray, bool]:
    """Dispatch on suffix; return the array and whether it is a ``(D, H, W)`` volume."""
    _check_window(window)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found; expected an image file here (check the manifest)")
    if not path.is_file():
        raise ImageReadError(f"{path}: is a directory or special file, expected an image file")
    suffix = _suffix(path)
    if suffix in _PIL_SUFFIXES:
        array, is_volume = _read_pil(path), False
    elif suffix == ".dcm" or (suffix == "" and _has_dicom_marker(path)):
        return _read_dicom(path, window)  # windowing needs the DICOM header; done inside
    elif suffix in (".nii", ".nii.gz"):
        array, is_volume = _read_nifti(path)
    elif suffix == ".npy":
        array, is_volume = _read_npy(path)
    else:
        shown = suffix or "no suffix (and no DICOM marker)"
        raise ImageReadError(
            f"{path}: unsupported image format {shown!r}; expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if isinstance(window, tuple):
        array = _apply_window(array, window)
    return array, is_volume


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _has_dicom_marker(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)  # phone/camera JPEGs store rotation in EXIF
            array = _pil_to_array(image)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageReadError(
            f"{path}: not a readable {_suffix(path)[1:].upper()} image ({type(err).__name__}: {err}); "
            "expected an image file that opens in an image viewer -- re-export it"
        ) from err
    return array


def _pil_to_array(image: object) -> np.ndarray:
    from PIL import Image

    assert isinstance(image, Image.Image)
    mode = image.mode
    if mode in ("L", "F", "1") or mode.startswith("I"):
        return np.asarray(image).astype(np.float32)  # 16-bit "I;16" stays 0-65535
    if mode in ("LA", "La"):
        return np.asarray(image.convert("L")).astype(np.float32)
    return np.asarray(image.convert("RGB")).astype(np.float32)  # RGBA, P, CMYK, YCbCr, ...


def _read_dicom(path: Path, window: Window) -> tuple[np.ndarray, bool]:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = _dcmread(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        uid = ds.get("SOPClassUID")
        kind = f"{getattr(uid, 'name', uid)}" if uid is not None else "unknown SOP class"
        raise ImageReadError(
            f"{path}: DICOM file has no pixel data ({kind}); expected an image, not a report or "
            "presentation state"
        )
    try:
        pixels = ds.pixel_array
    except Exception as err:  # missing decoder plugins, truncated pixel data, bad headers
        raise ImageReadError(
            f"{path}: DICOM pixel data cannot be decoded ({type(err).__name__}: {err}); expected "
            "uncompressed pixels or a compression for which a pydicom decoder (pylibjpeg, gdcm) is installed"
        ) from err
    samples = ds.get("SamplesPerPixel")
    colour = pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] == 3 and samples == 3)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        try:
            pixels, colour = apply_color_lut(pixels, ds), True
        except Exception as err:
            raise ImageReadError(
                f"{path}: DICOM palette colour lookup table is unusable ({type(err).__name__}: {err}); "
                "expected complete Red/Green/Blue Palette Color LUT tags"
            ) from err
    if colour:
        # Colour DICOM (endoscopy, dermatology, pathology) has no modality or VOI LUT; pydicom has
        # already converted YBR to RGB.
        return pixels.astype(np.float32), pixels.ndim == 4
    try:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)  # RescaleSlope/Intercept
    except Exception as err:
        raise ImageReadError(
            f"{path}: DICOM modality LUT / rescale tags are invalid ({type(err).__name__}: {err}); expected "
            "numeric RescaleSlope and RescaleIntercept"
        ) from err
    resolved = _dicom_window(path, ds) if window == "auto" else window
    if resolved is not None:
        assert isinstance(resolved, tuple)
        values = _apply_window(values, resolved)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 (common for CR/DX X-rays) shows low values bright. Flip so that "high =
        # bright" holds at every site; otherwise one hospital's X-rays arrive as negatives.
        values = values.max() + values.min() - values
    return values, values.ndim == 3


def _dcmread(path: Path) -> Any:
    """Read a DICOM dataset, also accepting files written without the 128-byte preamble.

    Older modalities and some anonymisation tools write "raw" DICOM without the preamble and
    ``DICM`` marker; pydicom only reads those with ``force=True``, which also "reads" any random
    file. The forced result is therefore accepted only when it looks like a real DICOM object.
    """
    import pydicom

    try:
        return pydicom.dcmread(path)
    except Exception as err:
        error = err
    try:
        ds = pydicom.dcmread(path, force=True)
        if "SOPClassUID" in ds or "PixelData" in ds:
            return ds
    except Exception:
        pass
    raise ImageReadError(
        f"{path}: not a readable DICOM file ({type(error).__name__}: {error}); expected a DICOM Part 10 "
        "file as exported by the PACS"
    ) from error


def _dicom_window(path: Path, ds: Any) -> tuple[float, float] | None:
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is None or width is None:
        return None
    try:
        c, w = float(_first(center)), float(_first(width))
    except (TypeError, ValueError, IndexError) as err:
        raise ImageReadError(
            f"{path}: DICOM WindowCenter/WindowWidth ({center!r}, {width!r}) are not numbers; pass "
            "window=None to ignore them or window=(center, width) to override"
        ) from err
    if not (math.isfinite(c) and math.isfinite(w) and w > 0):
        raise ImageReadError(
            f"{path}: DICOM window has center {c} and width {w}; expected a finite center and a positive "
            "width -- pass window=None to ignore it or window=(center, width) to override"
        )
    return c, w


def _first(value: Any) -> Any:
    """A DICOM tag may hold several windows (e.g. lung and mediastinum); the first is the default."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return value
    return value[0]


def _read_nifti(path: Path) -> tuple[np.ndarray, bool]:
    import nibabel as nib

    try:
        image = nib.load(path)
        shape = tuple(int(s) for s in image.shape)
        while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1) is a 3-D volume saved as 4-D
            shape = shape[:-1]
        if len(shape) not in (2, 3):
            raise ImageReadError(
                f"{path}: image has shape {tuple(image.shape)}, expected a 2D image or a 3D volume "
                "(a 4D series such as fMRI/DWI must be split into one volume per file first)"
            )
        if len(shape) == 2:
            shape = (*shape, 1)
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(("L", "P", "S"))
        )
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
        data = nib.orientations.apply_orientation(data, ornt)
    except ImageReadError:
        raise
    except Exception as err:
        raise ImageReadError(
            f"{path}: not a readable NIfTI file ({type(err).__name__}: {err}); expected a NIfTI-1/2 image "
            "(.nii or gzip-compressed .nii.gz)"
        ) from err
    return np.transpose(data, (2, 1, 0)), True  # (L, P, S) -> (S, P, L) = (D, H, W)


def _read_npy(path: Path) -> tuple[np.ndarray, bool]:
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:  # pickled objects, truncated files, not .npy at all
        raise ImageReadError(
            f"{path}: not a readable .npy array ({type(err).__name__}: {err}); expected an array saved with "
            "numpy.save of a numeric (not object) dtype"
        ) from err
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise ImageReadError(f"{path}: array has dtype {array.dtype}, expected real numbers (int or float)")
    if array.size == 0:
        raise ImageReadError(f"{path}: array has shape {array.shape} and is empty, expected image pixels")
    if array.ndim == 2:
        return array.astype(np.float32), False
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):  # channel-last picture
        if array.shape[2] == 1:
            return array[..., 0].astype(np.float32), False
        return array[..., :3].astype(np.float32), False  # 4 channels are taken as RGBA
    if array.ndim == 3:
        return array.astype(np.float32), True
    raise ImageReadError(
        f"{path}: image has shape {array.shape}, expected a 2D image (H, W), a colour image (H, W, 3) "
        "or a 3D volume (D, H, W)"
    )


def _pick_slice(path: Path, volume: np.ndarray, slice_index: int | None) -> np.ndarray:
    depth = volume.shape[0]
    index = depth // 2 if slice_index is None else slice_index
    if not -depth <= index < depth:
        raise ImageReadError(
            f"{path}: slice_index={slice_index} is out of range; the volume has {depth} slice(s) "
            f"(valid: 0..{depth - 1})"
        )
    return volume[index]


def _check_window(window: Window) -> None:
    if window is None or window == "auto":
        return
    if not (isinstance(window, tuple) and len(window) == 2):
        raise ValueError(f"window={window!r}; expected (center, width), None or 'auto'")
    center, width = (float(v) for v in window)
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise ValueError(f"window={window!r}; expected a finite center and a positive width")


def _apply_window(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    center, width = float(window[0]), float(window[1])
    return np.clip(array, center - width / 2, center + width / 2).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def to_tensor_image(array: np.ndarray, size: tuple[int, int], channels: int = 1) -> torch.Tensor:
    """Make a ``(channels, H, W)`` float32 tensor with values in ``[0, 1]`` from a read image.

    * Channels: grey is repeated to RGB; RGB becomes grey by ITU-R 601 luminance (PIL's weights);
      a 4th (alpha) channel is dropped.
    * Size: bilinear resampling with antialiasing, so downsizing a 512-pixel scan to 64 pixels
      averages rather than aliases thin structures.
    * Intensity: per-image min-max to ``[0, 1]``, computed over all channels together so colour
      balance survives. Min-max rather than z-score because it gives the same bounded range for
      every site whatever the units (HU, MR scanner units, 8-bit pixels), which keeps
      :func:`augment`'s brightness/contrast jitter meaningful; outliers that would squash the
      range are the DICOM window's job. A constant image (range below 1e-5 of its magnitude)
      becomes all zeros, never NaN; non-finite pixels (NaN/inf from a pipeline's masks) become 0.
    """
    height, width = _check_size(size)
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}; expected 1 (grey) or 3 (RGB)")
    data = np.asarray(array, dtype=np.float32)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[..., 0]
    if data.ndim == 3 and data.shape[2] == 4:
        data = data[..., :3]
    if not (data.ndim == 2 or (data.ndim == 3 and data.shape[2] == 3)) or min(data.shape[:2]) < 1:
        raise ValueError(f"image array has shape {data.shape}; expected (H, W) grey or (H, W, 3) colour")
    tensor = torch.from_numpy(np.ascontiguousarray(data))
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        fill = tensor[finite].min() if bool(finite.any()) else torch.tensor(0.0)
        tensor = torch.where(finite, tensor, fill)
    if channels == 1 and tensor.shape[0] == 3:
        weights = torch.tensor(_LUMA, dtype=torch.float32).view(3, 1, 1)
        tensor = (tensor * weights).sum(dim=0, keepdim=True)
    elif channels == 3 and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if tuple(tensor.shape[1:]) != (height, width):
        tensor = F.interpolate(
            tensor[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )[0]
    return _min_max(tensor).contiguous()


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or int(s) < 1 for s in size):
        raise ValueError(f"size={size!r}; expected (height, width) with positive integers")
    return int(size[0]), int(size[1])


def _min_max(tensor: torch.Tensor) -> torch.Tensor:
    # A range below float32 resolution of the values is rounding noise (e.g. a flat region after
    # resampling), not contrast; stretching it to [0, 1] would invent structure.
    low, high = float(tensor.min()), float(tensor.max())
    if not high - low > _FLAT_TOLERANCE * max(1.0, abs(low), abs(high)):
        return torch.zeros_like(tensor)
    return ((tensor - low) / (high - low)).clamp_(0.0, 1.0)


def load_image_tensor(
    path: str | Path,
    size: tuple[int, int],
    channels: int = 1,
    *,
    window: Window = "auto",
    slice_index: int | None = None,
) -> torch.Tensor:
    """:func:`read_image` then :func:`to_tensor_image`: the one call a Dataset needs per sample."""
    array = read_image(path, window=window, slice_index=slice_index)
    return to_tensor_image(array, size=size, channels=channels)


def augment(
    image: torch.Tensor,
    generator: torch.Generator,
    *,
    max_brightness: float = 0.1,
    max_contrast: float = 0.1,
) -> torch.Tensor:
    """Light train-time augmentation of a ``(C, H, W)`` (or ``(..., H, W)``) image; same shape out.

    Random horizontal and vertical flips, a rotation by a multiple of 90 degrees (only 180 when
    the image is not square, so the shape never changes), then contrast scaling around the mean
    by ``1 ± max_contrast`` and a brightness shift of ``± max_brightness`` (in the units of a
    :func:`to_tensor_image` output, whose range is 1). Results are clamped to the input's value
    range, like a display saturating. Kept light on purpose: medical images carry meaning in
    fine intensity differences, and heavy colour/elastic changes need a per-dataset decision.

    The same ``generator`` state gives the same output, so a (seed, epoch, case) triple is
    reproducible across workers and restarts. The input is never modified in place, so cached
    tensors stay clean.
    """
    if image.ndim < 2:
        raise ValueError(f"image has shape {tuple(image.shape)}; expected (C, H, W)")
    # Always draw the same number of values, whatever branches are taken, so the generator's
    # state after the call does not depend on the image.
    draws = torch.rand(5, generator=generator, device=generator.device).tolist()
    out = image
    if draws[0] < 0.5:
        out = out.flip(-1)
    if draws[1] < 0.5:
        out = out.flip(-2)
    square = out.shape[-1] == out.shape[-2]
    turns = int(draws[2] * 4) % 4 if square else 2 * (int(draws[2] * 2) % 2)
    if turns:
        out = torch.rot90(out, turns, dims=(-2, -1))
    contrast = 1.0 + (2.0 * draws[3] - 1.0) * max_contrast
    brightness = (2.0 * draws[4] - 1.0) * max_brightness
    low, high = image.min(), image.max()
    mean = out.mean()
    out = (out - mean) * contrast + mean + brightness
    return torch.clamp(out, min=low, max=high)
