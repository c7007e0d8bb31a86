"""A model for inference outside fedfusion: raw inputs -> the site's preprocessing -> :class:`FusionModel`.

Why a wrapper: :class:`FusionModel` reads the data loader's internal tensors (standardised values
interleaved with missing flags, category index + 1). A hospital system calling an ONNX or TorchScript
file has raw lab values, category levels and image pixels. :class:`ExportableModel` takes exactly
those and holds the standardisation statistics as buffers, so the exported graph is preprocessing +
model and reproduces what the site computes (``fedfusion.common.data.MultimodalDataset``).

Statistics are a *site's*: every site standardises with means/stds of its own training rows
(``Preprocessor.fit``), and a federated model has no single set. The caller picks whose
(``fedfusion export --site`` / ``--manifest``; docs/export.md).

Inputs, in graph order (:func:`export_inputs`); B is dynamic:

- each image modality (``image``, or ``image_<sequence>`` for ``image:<sequence>``): float32
  (B, C, H, W) or (B, C, D, H, W) for volumes, exactly what ``fedfusion.common.imaging.load_image_tensor``
  (``load_volume_tensor`` for volumes) returns for the schema's size/channels; zeros when absent;
- ``clinical_num``: float64 (B, numeric columns) raw values in schema order, NaN = missing;
- ``clinical_cat``: int64 (B, categorical columns) 0-based index into the column's levels,
  -1 (or any index outside them) = missing/unknown;
- ``omics``: float64 (B, features) raw values, NaN = missing;
- ``mask``: bool (B, modalities) True where the case has the modality (an image file, any clinical
  value, any omics value); every row needs at least one.

float64 for raw tabular values because the site standardises in float64 before casting to float32;
doing the same in the graph makes the standardised values bit-identical to the site's.

Outputs (:attr:`ExportableModel.output_names`): ``logits`` (B, classes) for classification, ``risk``
(B,) for survival, ``modality_weights`` (B, modalities) for fusions that expose them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Schema
from .model import FusionModel

#: Bumped when the input/metadata contract changes, so a reader can refuse what it does not know.
EXPORT_CONTRACT = 1
OUTPUT_ORDER = ("logits", "risk", "modality_weights")
OUTPUT_MEANING = {
    "logits": "float32 (B, classes): class scores in the order of 'classes' (softmax gives probabilities)",
    "risk": "float32 (B,): Cox risk score, higher = earlier event",
    "modality_weights": "float32 (B, modalities): the fusion's per-case modality weights, rows sum to 1",
}


@dataclass(frozen=True)
class ExportInput:
    """One graph input: its name, the fedfusion batch key it becomes, dtype, shape (``"B"`` = batch)."""

    name: str
    key: str
    dtype: str
    shape: tuple[int | str, ...]
    meaning: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}


def input_name(key: str) -> str:
    """A graph-safe name for a batch key (``image:t1`` -> ``image_t1``)."""
    return re.sub(r"[^0-9A-Za-z_]", "_", key)


def export_inputs(schema: Schema) -> list[ExportInput]:
    """The exported model's inputs for ``schema``, in graph order (see the module docstring)."""
    if schema.visits is not None:
        raise ValueError(f"schema '{schema.name}' has a 'visits' modality; exporting visit sequences is not "
                         "supported yet (export a schema without visits)")
    inputs = [ExportInput(input_name(m), m, "float32", ("B", *spec.shape),
                          f"pixels as load_image_tensor(path, size={list(spec.size)}, channels={spec.channels}) "
                          "returns them (values in [0, 1]); zeros when the case has no image")
              for m, spec in schema.image_specs.items()]
    if schema.numeric_columns:
        inputs.append(ExportInput("clinical_num", "clinical_num", "float64", ("B", len(schema.numeric_columns)),
                                  "raw values of the numeric clinical columns in 'clinical_numeric_columns' "
                                  "order; NaN = missing"))
    if schema.categorical_columns:
        inputs.append(ExportInput("clinical_cat", "clinical_cat", "int64", ("B", len(schema.categorical_columns)),
                                  "per categorical column, the 0-based index of the value in "
                                  "'categorical_levels'; -1 = missing or a level the schema does not list"))
    if schema.omics:
        inputs.append(ExportInput("omics", "omics", "float64", ("B", len(schema.omics)),
                                  "raw values of 'omics_features' in order; NaN = missing"))
    inputs.append(ExportInput("mask", "mask", "bool", ("B", len(schema.modalities)),
                              "True where the case has the modality ('modalities' order); at least one per row"))
    return inputs


def _float64(values: Sequence[float] | np.ndarray, width: int, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if tensor.shape != (width,):
        raise ValueError(f"{what} has {tuple(tensor.shape)} values; the schema needs {width}")
    return tensor


class ExportableModel(nn.Module):
    """Raw inputs (:func:`export_inputs`) -> the site's standardisation -> ``model`` -> outputs tuple.

    ``clinical_mean``/``clinical_std`` are per numeric column, ``omics_mean``/``omics_std`` per
    feature, as ``fedfusion.common.data.Preprocessor`` holds them. ``forward`` takes the inputs
    positionally, in :attr:`inputs` order, so ``torch.jit.trace`` and ``torch.onnx.export`` record
    one graph; :meth:`batch` gives the model's own batch (what the tests compare against).
    """

    clinical_mean: torch.Tensor
    clinical_std: torch.Tensor
    omics_mean: torch.Tensor
    omics_std: torch.Tensor
    category_counts: torch.Tensor

    def __init__(self, model: FusionModel, schema: Schema, *, clinical_mean: Sequence[float] | np.ndarray,
                 clinical_std: Sequence[float] | np.ndarray, omics_mean: Sequence[float] | np.ndarray,
                 omics_std: Sequence[float] | np.ndarray) -> None:
        super().__init__()
        self.model = model.eval()
        self.schema = schema
        self.inputs = export_inputs(schema)
        n_num, n_omics = len(schema.numeric_columns), len(schema.omics)
        self.register_buffer("clinical_mean", _float64(clinical_mean, n_num, "clinical_mean"))
        self.register_buffer("clinical_std", _float64(clinical_std, n_num, "clinical_std"))
        self.register_buffer("omics_mean", _float64(omics_mean, n_omics, "omics_mean"))
        self.register_buffer("omics_std", _float64(omics_std, n_omics, "omics_std"))
        self.register_buffer("category_counts", torch.tensor([len(c.categories) for c in schema.categorical_columns],
                                                              dtype=torch.long))
        self.eval()  # exported for inference: no dropout, no modality dropout
        with torch.no_grad():
            out = self.model(self.batch(*self.example_inputs()))
        self.output_names = [k for k in OUTPUT_ORDER if k in out]

    def batch(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fedfusion batch the data loader would have made from these raw inputs."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs {[i.name for i in self.inputs]}, got {len(inputs)}")
        out: dict[str, torch.Tensor] = {}
        for spec, value in zip(self.inputs, inputs, strict=True):
            if spec.key == "clinical_num":
                raw = value.to(torch.float64)
                missing = torch.isnan(raw)
                z = torch.where(missing, torch.zeros_like(raw), (raw - self.clinical_mean) / self.clinical_std)
                # [value, missing flag] per column, as the clinical encoder reads them
                out["clinical_num"] = torch.stack([z, missing.to(torch.float64)], dim=2).flatten(1).to(torch.float32)
            elif spec.key == "clinical_cat":
                index = value.to(torch.long)
                known = (index >= 0) & (index < self.category_counts)
                out["clinical_cat"] = torch.where(known, index + 1, torch.zeros_like(index))  # 0 = missing
            elif spec.key == "omics":
                raw = value.to(torch.float64)
                z = torch.where(torch.isnan(raw), torch.zeros_like(raw), (raw - self.omics_mean) / self.omics_std)
                out["omics"] = z.to(torch.float32)
            elif spec.key == "mask":
                out["mask"] = value.to(torch.bool)
            else:
                out[spec.key] = value.to(torch.float32)
        return out

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(self.batch(*inputs))
        return tuple(out[k] for k in self.output_names)

    def example_inputs(self, batch_size: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Plausible inputs for tracing: every modality present, some values missing, one unknown level.

        ``batch_size`` >= 2: torch.export treats a size-1 dimension as fixed, and the batch must stay dynamic.
        """
        generator = torch.Generator().manual_seed(seed)
        tensors: list[torch.Tensor] = []
        for spec in self.inputs:
            shape = (batch_size, *(int(s) for s in spec.shape[1:]))
            if spec.dtype == "float32":
                tensors.append(torch.rand(shape, generator=generator))
            elif spec.dtype == "float64":
                raw = torch.randn(shape, generator=generator, dtype=torch.float64)
                raw[0, 0] = float("nan")
                tensors.append(raw)
            elif spec.key == "clinical_cat":
                index = torch.randint(0, 2, shape, generator=generator)
                index[0, 0] = -1
                tensors.append(index)
            else:
                tensors.append(torch.ones(shape, dtype=torch.bool))
        return tuple(tensors)


def export_metadata(wrapper: ExportableModel, **extra: Any) -> dict[str, Any]:
    """What a caller needs to feed the graph and read its outputs; written beside/inside the file.

    ``extra`` adds provenance (fedfusion version, run, selected round, whose statistics).
    """
    schema = wrapper.schema
    return {
        "fedfusion_export_contract": EXPORT_CONTRACT,
        "inputs": [i.to_dict() for i in wrapper.inputs],
        "outputs": [{"name": k, "meaning": OUTPUT_MEANING[k]} for k in wrapper.output_names],
        "modalities": list(schema.modalities),
        "classes": list(schema.classes),
        "clinical_numeric_columns": [c.name for c in schema.numeric_columns],
        "categorical_levels": {c.name: list(c.categories) for c in schema.categorical_columns},
        "omics_features": list(schema.omics),
        "statistics": {k: getattr(wrapper, k).tolist()
                       for k in ("clinical_mean", "clinical_std", "omics_mean", "omics_std")},
        "schema": schema.to_dict(),
        **extra,
    }
