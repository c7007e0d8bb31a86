"""``fedfusion export RUN_DIR --format onnx|torchscript``: a run's model as one self-contained file.

The file holds the graph of :class:`~fedfusion.common.models.export.ExportableModel` (raw inputs ->
standardisation -> the global model) and, as metadata, everything a caller needs to feed it: inputs,
column order, category levels, statistics, schema, fedfusion version, the delivered round. The same
JSON is written beside it (``<file>.json``) for people to read.

Whose preprocessing: a federated model has none of its own. Every site standardises clinical and
omics values with means/stds of its *own* training rows (``Preprocessor.fit``, as ``client.runtime``
does), and those statistics never leave the site, so ``model.pt`` cannot hold them. An export is
therefore made *for one site*, where its manifest can be read: ``--manifest`` (a hospital exporting
the model the coordinator shipped it) or ``--site`` (a simulated run: ``site-<site>.csv`` in the run's
data folder, found as ``fedfusion explain`` finds it). A ``train-local`` model stores the statistics
it trained with and needs neither. The exported file then contains that site's per-feature
means/stds: aggregates of its patients, to be shared only as the site would share them.

Before returning, the export is read back (``torch.jit.load`` / ``onnxruntime``) and run on the site's
test rows from raw values (:func:`raw_inputs`); its outputs must equal the PyTorch model's on the
site's own pipeline (:class:`~fedfusion.common.data.MultimodalDataset`) to ``TOLERANCE``.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from fedfusion import __version__
from fedfusion.common.config import Schema
from fedfusion.common.data import MultimodalDataset, Preprocessor, read_omics_vector
from fedfusion.common.manifest import Manifest, ManifestError, load_manifest
from fedfusion.common.models.export import ExportableModel, export_metadata
from fedfusion.simulations.explain import ExplainError, LoadedModel, find_model, find_sites, load_global_model

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
#: Largest |exported - PyTorch| output accepted on the site's test rows.
TOLERANCE = 1e-5
#: The metadata key (ONNX ``metadata_props``) / extra file name (TorchScript) holding the JSON.
METADATA_KEY = "fedfusion.json"
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says what is missing and what to pass."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sidecar: Path
    site: str
    rows_checked: int
    max_abs_diff: float


def check_onnx_available() -> None:
    """Fail early, in one line, when the ``export`` extra is not installed."""
    missing = [name for name in _ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: pip install 'fedfusion[export]' "
                          "(or use --format torchscript, which needs nothing extra)")


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, *, site: str | None = None,
               manifest: str | Path | None = None) -> ExportResult:
    """Export the model of ``run_dir`` with one site's preprocessing (see the module docstring)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        check_onnx_available()
    run_dir = Path(run_dir).resolve()
    try:
        loaded = load_global_model(find_model(run_dir))
    except ExplainError as err:
        raise ExportError(str(err)) from None
    if loaded.schema.visits is not None:
        raise ExportError(f"{loaded.path}: schema '{loaded.schema.name}' has a 'visits' modality; exporting visit "
                          "sequences is not supported yet")
    whose, pre, site_manifest = _statistics(loaded, run_dir, site, manifest)
    wrapper = ExportableModel(loaded.model, loaded.schema, clinical_mean=pre.clinical_mean,
                              clinical_std=pre.clinical_std, omics_mean=pre.omics_mean, omics_std=pre.omics_std)
    payload = torch.load(loaded.path, map_location="cpu", weights_only=True)
    meta = export_metadata(wrapper, fedfusion_version=__version__, format=fmt, source_model=str(loaded.path),
                           statistics_of=whose, selected_round=payload.get("selected_round"),
                           selection=payload.get("selection"), fusion=loaded.model.config.fusion)
    path = Path(out) if out else loaded.path.parent / "export" / f"model-{_slug(whose)}{SUFFIXES[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, indent=2, default=str)
    (_write_onnx if fmt == "onnx" else _write_torchscript)(wrapper, path, text)
    sidecar = path.with_name(path.name + ".json")
    sidecar.write_text(text + "\n")
    rows, diff = (0, float("nan")) if site_manifest is None else verify(path, fmt, wrapper, site_manifest, pre)
    if rows and not diff <= TOLERANCE:
        raise ExportError(f"{path}: the exported model differs from the PyTorch model by {diff:.3g} on {rows} test "
                          f"rows (tolerance {TOLERANCE}); please report this with the model's fusion and backbone")
    return ExportResult(path, sidecar, whose, rows, diff)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "site"


def _statistics(loaded: LoadedModel, run_dir: Path, site: str | None,
                manifest: str | Path | None) -> tuple[str, Preprocessor, Manifest | None]:
    """(whose statistics, the statistics, the manifest to verify on) -- see the module docstring."""
    if manifest is not None:
        found = _load(Path(manifest), loaded.schema)
        path = Path(manifest)  # a sites-dir site is <site>/manifest.csv: its folder names it
        label = site or (path.parent.name if path.stem == "manifest" and path.parent.name else path.stem)
        return label, Preprocessor.fit(found), found
    stored = torch.load(loaded.path, map_location="cpu", weights_only=True).get("preprocessor")
    if site is None and stored:  # train-local: one set of statistics, stored with the model
        return "train-local", Preprocessor.from_dict(stored), None
    sites = [s for s in str(loaded.run_config.get("sites", "")).split(",") if s]
    if site is None and len(sites) != 1:
        raise ExportError(f"{loaded.path}: each site standardises inputs with its own training rows' statistics, so a "
                          "federated model is exported for one site: pass --site "
                          f"({', '.join(sites) if sites else 'a site of the run'}) or --manifest SITE_MANIFEST.csv")
    site = site or sites[0]
    if site not in sites:
        raise ExportError(f"--site {site!r} is not a site of this run; its sites: {', '.join(sites) or 'none listed'} "
                          "(or pass --manifest SITE_MANIFEST.csv)")
    try:
        paths = find_sites(loaded, run_dir)
    except ExplainError as err:
        raise ExportError(f"{err}; or pass --manifest SITE_MANIFEST.csv") from None
    found = _load(paths[site], loaded.schema)
    return site, Preprocessor.fit(found), found


def _load(path: Path, schema: Schema) -> Manifest:
    """The manifest exactly as the site loads it (``client.runtime.load_site``), so its split is the site's."""
    if not path.is_file():
        raise ExportError(f"--manifest {path}: no such file")
    try:
        return load_manifest(path, schema, check_images=False, allow_single_class=True)
    except ManifestError as err:
        raise ExportError(f"{path}: {err}") from None


@contextmanager
def _torchscript_quietly() -> Iterator[None]:
    """TorchScript is deprecated in favour of torch.export but remains what LibTorch deployments load:
    its deprecation notes are not the user's to act on. Trace also freezes the shape checks on the
    fixed feature sizes (intended); :func:`verify` runs the result on another batch size and mask
    pattern, which would expose anything else frozen."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated")
        yield


def _write_torchscript(wrapper: ExportableModel, path: Path, metadata: str) -> None:
    with _torchscript_quietly():
        traced = torch.jit.trace(wrapper, wrapper.example_inputs(), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: metadata})


def _write_onnx(wrapper: ExportableModel, path: Path, metadata: str) -> None:
    import onnx

    names = [spec.name for spec in wrapper.inputs]
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the exporter's notes on dim names shared by every input
        torch.onnx.export(wrapper, wrapper.example_inputs(), str(path), input_names=names,
                          output_names=list(wrapper.output_names), dynamic_shapes=(tuple({0: batch} for _ in names),),
                          dynamo=True, external_data=False, verbose=False)
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON an export carries inside it (ONNX ``metadata_props`` or TorchScript extra file)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):  # TorchScript files are zip archives, ONNX files protobuf
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    extra = {METADATA_KEY: ""}
    with _torchscript_quietly():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_KEY])


# ----------------------------------------------------------------------------------- raw inputs + check


def raw_inputs(manifest: Manifest, rows: np.ndarray, images: dict[str, torch.Tensor],
               mask: torch.Tensor) -> dict[str, np.ndarray]:
    """The exported model's inputs for manifest ``rows``: what a caller computes from its own records.

    ``images`` (per image modality) and ``mask`` come from the site's dataset: pixels are decoded outside
    the graph (``load_image_tensor``), and presence is the manifest's (``Manifest.modality_present``).
    """
    schema, frame = manifest.schema, manifest.frame.iloc[rows]
    out: dict[str, np.ndarray] = {m: images[m].numpy().astype(np.float32) for m in schema.image_specs}
    if schema.numeric_columns:
        out["clinical_num"] = frame[[c.name for c in schema.numeric_columns]].to_numpy(dtype=np.float64)
    if schema.categorical_columns:
        out["clinical_cat"] = np.stack(
            [np.array([{v: i for i, v in enumerate(c.categories)}.get(v, -1) for v in frame[c.name]], dtype=np.int64)
             for c in schema.categorical_columns], axis=1)
    if schema.omics:
        if "omics" in frame.columns:  # one file per case
            out["omics"] = np.stack([np.full(len(schema.omics), np.nan) if p is None
                                     else read_omics_vector(Path(p), len(schema.omics)) for p in frame["omics"]])
        else:
            out["omics"] = frame[list(schema.omics)].to_numpy(dtype=np.float64)
    out["mask"] = mask.numpy().astype(bool)
    return out


def run_export(path: Path, fmt: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Outputs of the exported file on these inputs (graph order), read back as a deployment would."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {arg.name: value for arg, value in zip(session.get_inputs(), inputs, strict=True)}
        return [np.asarray(o) for o in session.run(None, feed)]
    with _torchscript_quietly():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return [o.numpy() for o in module(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))]


def verify(path: Path, fmt: str, wrapper: ExportableModel, manifest: Manifest, pre: Preprocessor) -> tuple[int, float]:
    """(rows, max |exported - PyTorch|) over the site's test rows (all rows when it has none)."""
    rows = manifest.rows("test")
    rows = rows if len(rows) else manifest.rows(None)
    data = MultimodalDataset(manifest, pre, rows=rows, cache_images=False)
    batch = default_collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        expected = wrapper.model(batch)
    raw = raw_inputs(manifest, rows, {m: batch[m] for m in manifest.schema.image_specs}, batch["mask"])
    got = run_export(path, fmt, [raw[spec.key] for spec in wrapper.inputs])
    diffs = [float(np.max(np.abs(g - expected[k].numpy()), initial=0.0))
             for k, g in zip(wrapper.output_names, got, strict=True)]
    return len(rows), max(diffs)
