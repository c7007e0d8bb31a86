"""A torch Dataset over a validated manifest: image + clinical + omics + modality mask + targets.

Items are dicts (Opacus' DP data loader learns the batch structure from the first batch), with
the keys the model consumes (see ``fedfusion.common.models``):

- ``image`` float (C, H, W), or (C, D, H, W) when the schema's image has a depth; zeros when absent;
  a multi-sequence schema has one such tensor per sequence, under its modality name (``image:t1``);
- ``clinical_num`` float (2 * numeric columns): per column [standardised value, missing flag];
- ``clinical_cat`` long (categorical columns): category index + 1, 0 = missing;
- ``omics`` float (features), standardised, 0 where missing;
- ``mask`` bool (modalities): modality present for this case;
- ``label`` long (classification; -1 when the schema has none), ``time`` / ``event`` float.

Standardisation statistics come from the site's own training rows (:meth:`Preprocessor.fit`),
so nothing about other sites' patients is needed; the same fitted object is applied to val/test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedfusion.common.config import Schema
from fedfusion.common.imaging import ImageReadError, augment, load_image_tensor
from fedfusion.common.longitudinal import fit_visit_stats, visit_tensors
from fedfusion.common.manifest import Manifest
from fedfusion.common.volumes import load_volume_tensor


class DataError(RuntimeError):
    """A case could not be turned into tensors; the message names the manifest line and file."""


@dataclass(frozen=True)
class Preprocessor:
    """Per-feature mean/std for numeric clinical columns, omics features and per-visit columns, and the
    visit time scale (train split only; the visit fields stay empty without a ``visits`` schema)."""

    clinical_mean: np.ndarray
    clinical_std: np.ndarray
    omics_mean: np.ndarray
    omics_std: np.ndarray
    visits_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    visits_std: np.ndarray = field(default_factory=lambda: np.ones(0))
    visits_time_scale: np.ndarray = field(default_factory=lambda: np.ones(1))

    @classmethod
    def fit(cls, manifest: Manifest, rows: np.ndarray | None = None) -> Preprocessor:
        rows = manifest.rows("train") if rows is None else rows
        schema = manifest.schema
        clinical = _numeric_block(manifest, [c.name for c in schema.numeric_columns], rows)
        omics = _omics_block(manifest, rows) if schema.omics else np.zeros((len(rows), 0))
        c_mean, c_std = _nan_stats(clinical)
        o_mean, o_std = _nan_stats(omics)
        if schema.visits is None:
            return cls(c_mean, c_std, o_mean, o_std)
        v_mean, v_std, v_scale = fit_visit_stats(manifest.frame, rows, len(schema.visits.columns))
        return cls(c_mean, c_std, o_mean, o_std, v_mean, v_std, v_scale)

    def to_dict(self) -> dict[str, list[float]]:
        keys = ["clinical_mean", "clinical_std", "omics_mean", "omics_std"]
        keys += ["visits_mean", "visits_std", "visits_time_scale"] if len(self.visits_mean) else []
        return {k: getattr(self, k).tolist() for k in keys}

    @classmethod
    def from_dict(cls, raw: dict[str, list[float]]) -> Preprocessor:
        return cls(**{k: np.asarray(v, dtype=np.float64) for k, v in raw.items()})


def _nan_stats(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std ignoring NaN; an all-missing or constant feature gets mean 0 / std 1 (no NaN out)."""
    if block.shape[1] == 0:
        return np.zeros(0), np.ones(0)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(block, axis=0)
            std = np.nanstd(block, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    return mean, std


def _numeric_block(manifest: Manifest, columns: list[str], rows: np.ndarray) -> np.ndarray:
    if not columns:
        return np.zeros((len(rows), 0))
    return manifest.frame.iloc[rows][columns].to_numpy(dtype=np.float64)


def _omics_block(manifest: Manifest, rows: np.ndarray) -> np.ndarray:
    frame = manifest.frame
    if "omics" not in frame.columns:
        return _numeric_block(manifest, list(manifest.schema.omics), rows)
    width = len(manifest.schema.omics)
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        path = frame["omics"].iloc[row]
        if path is not None:
            out[i] = read_omics_vector(Path(path), width, line=int(row) + 2)
    return out


def read_omics_vector(path: Path, width: int, line: int | None = None) -> np.ndarray:
    """Read one case's omics vector from ``.npy`` or a one-row ``.csv``; length must match the schema."""
    where = f"{path}" + (f" (manifest line {line})" if line is not None else "")
    try:
        if path.suffix == ".npy":
            vector = np.load(path, allow_pickle=False).astype(np.float64).ravel()
        else:
            vector = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=1).ravel()
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: unreadable omics vector ({err}); expected .npy or a one-row .csv") from None
    if vector.shape[0] != width:
        raise DataError(f"{where}: omics vector has {vector.shape[0]} values; the schema lists {width} features")
    return vector


class MultimodalDataset(Dataset):
    """Tensors for the rows of one split of a manifest.

    Images are read lazily and cached (``cache_images``) because a site's cohort of small images
    fits in memory and re-decoding PNG/DICOM each epoch dominates CPU training time.
    """

    def __init__(
        self,
        manifest: Manifest,
        preprocessor: Preprocessor,
        split: str | None = None,
        *,
        rows: np.ndarray | None = None,
        train_augment: bool = False,
        seed: int = 0,
        cache_images: bool = True,
    ):
        self.manifest = manifest
        self.schema: Schema = manifest.schema
        self.rows = manifest.rows(split) if rows is None else np.asarray(rows)
        self.image_specs = self.schema.image_specs
        self.train_augment = train_augment and bool(self.image_specs)
        self.seed = seed
        self.epoch = 0
        self.cache_images = cache_images
        self._image_cache: dict[tuple[str, int], torch.Tensor] = {}
        self._tabular = self._build_tabular(preprocessor)

    def _build_tabular(self, pre: Preprocessor) -> dict[str, torch.Tensor]:
        schema, frame, rows = self.schema, self.manifest.frame, self.rows
        out: dict[str, torch.Tensor] = {}
        present = self.manifest.modality_present().iloc[rows].to_numpy(dtype=bool)
        out["mask"] = torch.from_numpy(present.copy())
        if schema.clinical:
            values = _numeric_block(self.manifest, [c.name for c in schema.numeric_columns], rows)
            missing = np.isnan(values)
            z = np.where(missing, 0.0, (values - pre.clinical_mean) / pre.clinical_std)
            interleaved = np.stack([z, missing.astype(np.float64)], axis=2).reshape(len(rows), -1)
            out["clinical_num"] = torch.tensor(interleaved, dtype=torch.float32)
            cats = np.zeros((len(rows), len(schema.categorical_columns)), dtype=np.int64)
            for j, col in enumerate(schema.categorical_columns):
                lookup = {c: i + 1 for i, c in enumerate(col.categories)}
                cats[:, j] = [lookup.get(v, 0) for v in frame[col.name].iloc[rows]]
            out["clinical_cat"] = torch.from_numpy(cats)
        if schema.omics:
            omics = _omics_block(self.manifest, rows)
            z = np.where(np.isnan(omics), 0.0, (omics - pre.omics_mean) / pre.omics_std)
            out["omics"] = torch.tensor(z, dtype=torch.float32)
        if schema.visits is not None:
            out.update(visit_tensors(frame, rows, schema.visits.max_visits, pre.visits_mean, pre.visits_std,
                                     float(pre.visits_time_scale[0])))
        if schema.has_classification:
            lookup = {c: i for i, c in enumerate(schema.classes)}
            out["label"] = torch.tensor([lookup[v] for v in frame["label"].iloc[rows]], dtype=torch.long)
        else:
            out["label"] = torch.full((len(rows),), -1, dtype=torch.long)
        if schema.has_survival:
            out["time"] = torch.tensor(frame["time"].iloc[rows].to_numpy(), dtype=torch.float32)
            out["event"] = torch.tensor(frame["event"].iloc[rows].to_numpy(), dtype=torch.float32)
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Vary augmentation per epoch while keeping each (seed, epoch, case) reproducible."""
        self.epoch = epoch

    def _image(self, index: int, modality: str = "image") -> torch.Tensor:
        spec = self.image_specs[modality]
        if (modality, index) in self._image_cache:
            return self._image_cache[(modality, index)]
        row = int(self.rows[index])
        path = self.manifest.frame[modality].iloc[row]
        if path is None:
            tensor = torch.zeros(spec.shape)
        else:
            try:
                if spec.depth:  # a volume: (C, D, H, W); augment() flips/turns every slice alike
                    tensor = load_volume_tensor(path, spec.depth, spec.size, spec.channels)
                else:
                    tensor = load_image_tensor(path, size=spec.size, channels=spec.channels)
            except ImageReadError as err:
                raise DataError(f"{self.manifest.path}, line {row + 2}, column '{spec.column}': {err}") from None
        if self.cache_images:
            self._image_cache[(modality, index)] = tensor
        return tensor

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {key: value[index] for key, value in self._tabular.items()}
        for position, modality in enumerate(self.image_specs):  # image modalities lead schema.modalities
            image = self._image(index, modality)
            if self.train_augment and bool(item["mask"][position]):
                # the same seed for every sequence of a case: co-registered sequences get the same flips
                generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(self.rows[index]))) % 2**63)
                image = augment(image, generator)
            item[modality] = image
        return item

    @property
    def labels(self) -> np.ndarray:
        return self._tabular["label"].numpy()
