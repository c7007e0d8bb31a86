"""``fedfusion explain RUN_DIR``: what a federated global model looks at, site by site.

RUN_DIR is a run folder holding ``model.pt`` (the server's final global model: ``state_dict``,
``schema`` and ``run_config``) -- a ``fedfusion simulate`` output (``federated/model.pt`` is found
from its top folder) or an experiment's ``runs/seed-N/<method>``. The sites are the run config's
``sites``; their manifests (``site-<site>.csv``) are read from the run config's ``data-dir``, or,
when the folder was moved, from ``data/`` beside or above the run folder. Each site is scored on its
own test split, standardised with statistics fitted on its own training rows -- exactly what the
site computes in ``client.runtime`` -- so nothing here needs data to leave a site in a deployment.

Outputs (``--out``, default ``RUN_DIR/explain``):

- ``modality_weights.csv`` / ``.png``: mean per-sample modality weight per site and over all test
  rows (``attention``: softmax weights; ``gated``: normalised mean gates; ``late``: the averaging
  weights over present modalities). Rows sum to 1; an absent modality has weight 0, so the
  ``present_<m>`` share is listed beside it. Fusions without weights (concat, kronecker, early)
  are reported as such.
- ``gradcam/site-<site>-<case>.png`` + ``gradcam.csv``: Grad-CAM of the image encoder
  (:mod:`fedfusion.simulations.gradcam`) for the first ``n_cases`` test cases with an image at each
  site, with each map's centre of mass and peak (pixels) and the explained class: the positive
  class for a binary task (where the evidence for it is, in every case), else the predicted class.
- ``permutation_importance.csv`` / ``.png``: drop of the site's primary metric (AUC or C-index) on
  its test split when one clinical column, one omics feature or a whole modality is shuffled among
  the test rows that have it; ``n_repeats`` shuffles, mean +/- sd. A numeric column is shuffled
  with its missing flag. With more than ``max_features`` omics features only the ``max_features``
  with the largest mean |gradient x input| over all sites' test rows are permuted (one backward pass
  screens them; permuting 7,106 genes x repeats x sites would take long for little). The ``all
  sites`` rows average the per-site means (sd across sites). Small test splits give noisy drops:
  read the sd.
- ``explain.md``: the tables and figure links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset, default_collate  # noqa: E402

from fedfusion.client.runtime import site_manifest_path  # noqa: E402
from fedfusion.common.config import ConfigError, ModelConfig, Schema, modality_kind  # noqa: E402
from fedfusion.common.data import MultimodalDataset, Preprocessor  # noqa: E402
from fedfusion.common.federation_config import FederationConfig  # noqa: E402
from fedfusion.common.manifest import load_manifest  # noqa: E402
from fedfusion.common.models import create_model  # noqa: E402
from fedfusion.common.progress import StepCallback, report  # noqa: E402
from fedfusion.common.results import markdown_table, write_rows  # noqa: E402
from fedfusion.common.training import (  # noqa: E402
    LossFunction,
    Predictions,
    make_loader,
    metrics_from,
    pick_device,
    predict,
    primary_metric,
)
from fedfusion.simulations.gradcam import cam_centroid, find_target_layer, grad_cam, save_overlay  # noqa: E402


class ExplainError(ValueError):
    """The run folder cannot be explained; the message says what is missing and where it looked."""


@dataclass
class LoadedModel:
    """A global model rebuilt from ``model.pt`` with the schema and run config it was trained under."""

    model: torch.nn.Module
    schema: Schema
    run_config: dict[str, Any]
    path: Path


def find_model(run_dir: Path) -> Path:
    for candidate in (run_dir / "model.pt", run_dir / "federated" / "model.pt", run_dir):
        if candidate.is_file():
            return candidate
    raise ExplainError(f"{run_dir}: no model.pt (looked in {run_dir} and {run_dir / 'federated'}); point at a "
                       "`fedfusion simulate` output or an experiment's runs/seed-N/<method> folder")


def load_global_model(path: str | Path) -> LoadedModel:
    """Rebuild the model saved in ``path`` (server ``model.pt``, or a ``train-local`` one) in eval mode."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for files it cannot read
        raise ExplainError(f"{path}: not a fedfusion model file ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or "state_dict" not in payload or "schema" not in payload:
        raise ExplainError(f"{path}: expected a dict with 'state_dict' and 'schema' (a fedfusion model.pt)")
    schema = Schema.from_dict(payload["schema"], source=str(path))
    run_config = dict(payload.get("run_config") or {})
    try:
        if run_config:
            model_cfg = FederationConfig.from_run_config(run_config).model
        else:
            model_cfg = ModelConfig(**{k: v for k, v in (payload.get("model_config") or {}).items()})
    except (ConfigError, TypeError) as err:
        raise ExplainError(f"{path}: cannot rebuild the model configuration ({err})") from err
    model = create_model(schema, model_cfg)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in payload["state_dict"].items()})
    return LoadedModel(model.eval(), schema, run_config, path)


def find_sites(loaded: LoadedModel, run_dir: Path) -> dict[str, Path]:
    """{site: manifest path} of the run's sites (see the module docstring for where it looks)."""
    sites = [s for s in str(loaded.run_config.get("sites", "")).split(",") if s]
    if not sites:
        raise ExplainError(f"{loaded.path}: the run config lists no sites; explain needs a simulated run folder")
    candidates = [Path(str(loaded.run_config.get("data-dir", "") or "/nonexistent")), run_dir / "data",
                  run_dir.parent / "data", loaded.path.parent.parent / "data"]
    for data_dir in candidates:
        paths = {s: site_manifest_path(data_dir, s) for s in sites}
        if all(p.is_file() for p in paths.values()):
            return paths
    raise ExplainError(f"{loaded.path}: site manifests site-<site>.csv for {sites} not found in "
                       f"{[str(c) for c in candidates]}")


# ----------------------------------------------------------------------------------- measures


class _Rows(Dataset):
    """Rows of a dict of equally long tensors (a whole test split held in memory)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return int(self.tensors["mask"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def split_tensors(data: Dataset) -> dict[str, torch.Tensor]:
    """The whole dataset as one batch (test splits of a site fit in memory)."""
    return default_collate([data[i] for i in range(len(data))])


def score(model: torch.nn.Module, tensors: dict[str, torch.Tensor], schema: Schema,
          device: str = "cpu") -> dict[str, float]:
    """All metrics of the model on these rows (:func:`fedfusion.common.training.metrics_from`)."""
    pred = predict(model, make_loader(_Rows(tensors), 256, shuffle=False), LossFunction(schema), torch.device(device))
    return metrics_from(pred)


def modality_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], schema: Schema,
                     device: str = "cpu") -> np.ndarray | None:
    """Per-sample modality weights (N, M) of the fusion, rows summing to 1; None if it exposes none."""
    pred = predict(model, make_loader(_Rows(tensors), 256, shuffle=False), LossFunction(schema), torch.device(device))
    return pred.modality_weights


def _modality_tensors(modality: str) -> list[str]:
    """The batch tensors that carry ``modality`` (an image sequence's key is its modality name)."""
    if modality_kind(modality) == "image":
        return [modality]
    return {"clinical": ["clinical_num", "clinical_cat"], "omics": ["omics"],
            "visits": ["visits", "visits_time", "visits_gap", "visits_mask"]}[modality]


def feature_groups(schema: Schema, omics: list[int] | None = None) -> list[tuple[str, str, dict[str, list[int]]]]:
    """(modality, feature, {tensor key: columns}) for each permutable feature, then each whole
    modality (``*``). A numeric clinical column owns its value and missing-flag columns."""
    groups: list[tuple[str, str, dict[str, list[int]]]] = []
    for j, col in enumerate(schema.numeric_columns):
        groups.append(("clinical", col.name, {"clinical_num": [2 * j, 2 * j + 1]}))
    for j, col in enumerate(schema.categorical_columns):
        groups.append(("clinical", col.name, {"clinical_cat": [j]}))
    for j in (range(len(schema.omics)) if omics is None else omics):
        groups.append(("omics", schema.omics[j], {"omics": [j]}))
    for m in schema.modalities:
        groups.append((m, "*", {k: [] for k in _modality_tensors(m)}))  # [] = every column of the tensor
    return groups


def permutation_importance(model: torch.nn.Module, tensors: dict[str, torch.Tensor], schema: Schema, *,
                           n_repeats: int = 5, seed: int = 0, omics: list[int] | None = None,
                           device: str = "cpu", on_step: StepCallback | None = None,
                           stage: str = "permutation importance") -> list[dict[str, Any]]:
    """Drop of the primary metric when each feature (or whole modality) is shuffled among the rows
    that have its modality; ``omics`` restricts the omics features permuted (indices). The
    ``n_repeats`` shuffles of a feature are scored in one pass (stacked rows). ``on_step`` hears
    ``stage feature k/N name`` before each feature: with hundreds of genes this is the long part."""
    metric = primary_metric(schema)
    base = score(model, tensors, schema, device).get(metric, math.nan)
    rng = np.random.default_rng(seed)
    mask = tensors["mask"].bool()
    rows: list[dict[str, Any]] = []
    groups = feature_groups(schema, omics)
    for number, (modality, feature, columns) in enumerate(groups, start=1):
        report(on_step, stage, number, len(groups), unit="feature",
               detail=f"{modality} (whole)" if feature == "*" else f"{feature} ({modality})")
        present = torch.nonzero(mask[:, schema.modalities.index(modality)]).flatten()
        copies = []
        for _ in range(n_repeats):
            shuffled = dict(tensors)
            order = present[torch.from_numpy(rng.permutation(len(present)))]
            for key, cols in columns.items():
                value = tensors[key].clone()
                if cols:
                    value[present[:, None], torch.tensor(cols)] = tensors[key][order[:, None], torch.tensor(cols)]
                else:
                    value[present] = tensors[key][order]
                shuffled[key] = value
            copies.append(shuffled)
        stacked = {k: torch.cat([c[k] for c in copies]) for k in tensors}
        drops = [base - m.get(metric, math.nan) for m in _score_chunks(model, stacked, schema, n_repeats, device)]
        finite = [d for d in drops if not math.isnan(d)]
        rows.append({"modality": modality, "feature": feature, "metric": metric, "baseline": base,
                     "importance_mean": float(np.mean(finite)) if finite else math.nan,
                     "importance_sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan,
                     "n_repeats": n_repeats, "n_rows": int(len(present))})
    return rows


def _score_chunks(model: torch.nn.Module, stacked: dict[str, torch.Tensor], schema: Schema, chunks: int,
                  device: str) -> list[dict[str, float]]:
    """Metrics of each of ``chunks`` equal consecutive blocks of rows, from one prediction pass."""
    pred = predict(model, make_loader(_Rows(stacked), 512, shuffle=False), LossFunction(schema), torch.device(device))
    n = len(stacked["mask"]) // chunks
    out = []
    for i in range(chunks):
        part = {k: None if getattr(pred, k) is None else getattr(pred, k)[i * n:(i + 1) * n]
                for k in ("probs", "labels", "risk", "time", "event")}
        out.append(metrics_from(Predictions(**part)))
    return out


def screen_omics(model: torch.nn.Module, tensor_sets: list[dict[str, torch.Tensor]], schema: Schema,
                 keep: int) -> list[int]:
    """Indices of the ``keep`` omics features with the largest mean |gradient x input| of the
    model's output (class logits summed, or risk) over the given rows."""
    total = torch.zeros(len(schema.omics))
    model.eval()
    for tensors in tensor_sets:
        batch = dict(tensors)
        batch["omics"] = tensors["omics"].clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(batch)
            target = out["logits"].max(dim=1).values.sum() if "logits" in out else out["risk"].sum()
            (grad,) = torch.autograd.grad(target, batch["omics"])
        total += (grad * batch["omics"]).abs().sum(dim=0).detach()
    return sorted(torch.argsort(total, descending=True)[:keep].tolist())


# ----------------------------------------------------------------------------------- the command


def explain_run(run_dir: str | Path, out_dir: str | Path | None = None, *, n_cases: int = 3, n_repeats: int = 5,
                max_features: int = 200, seed: int = 0, device: str = "auto",
                on_step: StepCallback | None = None) -> Path:
    """Write every explanation of the run's global model (see the module docstring); returns explain.md.

    ``on_step`` hears each step (loading, modality weights, Grad-CAM per site, permutation importance
    feature k/N per site): on a large omics panel the whole takes minutes."""
    run_dir = Path(run_dir).resolve()
    device = str(pick_device(device))  # "auto": CUDA when present, else CPU, as simulate and train-local resolve it
    report(on_step, "loading the model and the sites' test splits")
    loaded = load_global_model(find_model(run_dir))
    sites = find_sites(loaded, run_dir)
    out = Path(out_dir) if out_dir else run_dir / "explain"
    out.mkdir(parents=True, exist_ok=True)
    model, schema = loaded.model.to(device), loaded.schema
    data: dict[str, tuple[MultimodalDataset, dict[str, torch.Tensor]]] = {}
    for site, path in sites.items():
        manifest = load_manifest(path, schema, check_images=False, allow_single_class=True)
        test = MultimodalDataset(manifest, Preprocessor.fit(manifest), "test")
        if len(test):
            data[site] = (test, split_tensors(test))
    notes: list[str] = [f"Model: `{loaded.path}` (fusion `{model.config.fusion}`, modalities "
                        f"{', '.join(schema.modalities)}); sites: {', '.join(sites)}; each on its own test split."]
    missing = sorted(set(sites) - set(data))
    if missing:
        notes.append(f"Sites without test rows (skipped): {', '.join(missing)}.")
    lines = ["# fedfusion explain", ""] + notes + [""]
    report(on_step, "modality weights", detail=f"{len(data)} sites")
    lines += _weights_section(model, data, schema, out, device)
    lines += _gradcam_section(model, data, schema, out, n_cases, on_step)
    lines += _importance_section(model, data, schema, out, n_repeats, max_features, seed, device, on_step)
    (out / "explain.md").write_text("\n".join(lines) + "\n")
    return out / "explain.md"


def _weights_section(model: torch.nn.Module, data: dict[str, tuple[Any, dict[str, torch.Tensor]]], schema: Schema,
                     out: Path, device: str) -> list[str]:
    lines = ["## Modality weights", ""]
    per_site = {s: modality_weights(model, t, schema, device) for s, (_, t) in data.items()}
    if not per_site or any(w is None for w in per_site.values()):
        return lines + [f"Fusion `{model.config.fusion}` exposes no per-sample modality weights (attention, gated and "
                        "late do).", ""]
    rows = []
    for site, weights in [*per_site.items(), ("all sites", np.concatenate(list(per_site.values())))]:
        masks = (np.concatenate([t["mask"].numpy() for _, t in data.values()]) if site == "all sites"
                 else data[site][1]["mask"].numpy())
        row: dict[str, Any] = {"site": site, "n": int(len(weights))}
        row.update({f"weight_{m}": float(weights[:, i].mean()) for i, m in enumerate(schema.modalities)})
        row.update({f"present_{m}": float(masks[:, i].mean()) for i, m in enumerate(schema.modalities)})
        rows.append(row)
    write_rows(out / "modality_weights.csv", rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.8))
    bottom = np.zeros(len(rows))
    for m in schema.modalities:
        values = np.array([r[f"weight_{m}"] for r in rows])
        ax.bar([r["site"] for r in rows], values, bottom=bottom, label=m)
        bottom += values
    ax.set(ylabel="mean modality weight", ylim=(0, 1.05), title=f"{model.config.fusion} fusion: modality weights")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "modality_weights.png", dpi=110)
    plt.close(fig)
    return lines + ["Mean per-sample weight of each modality on each site's test rows (rows sum to 1; `present_` is "
                    "the share of rows that have the modality).", "", markdown_table(rows, digits=3), "",
                    "![modality weights](modality_weights.png)", ""]


def _gradcam_section(model: torch.nn.Module, data: dict[str, tuple[Any, dict[str, torch.Tensor]]], schema: Schema,
                     out: Path, n_cases: int, on_step: StepCallback | None = None) -> list[str]:
    lines = ["## Grad-CAM (image encoder)", ""]
    if not schema.image_specs:
        return lines + ["No image modality.", ""]
    rows: list[dict[str, Any]] = []
    for modality, spec in schema.image_specs.items():
        # separate encoders are encoders[modality]; a shared one is encoders["image"] for every sequence
        separate = modality in model.encoders
        encoder = model.encoders[modality] if separate else model.encoders["image"]
        who = "Image" if modality == "image" else f"`{modality}`"
        if spec.depth:
            lines += [f"{who}: skipped, volumes (depth {spec.depth}) have no 2-D Grad-CAM here.", ""]
            continue
        found = find_target_layer(encoder.backbone, spec.channels, tuple(spec.size))
        if found is None:
            lines += [f"{who}: skipped, the image backbone `{model.config.image_backbone}` is a transformer (or has "
                      "no spatial convolution); Grad-CAM needs a CNN feature map.", ""]
            continue
        name, layer = found
        rows += _gradcam_rows(model, data, schema, out, n_cases, modality, layer,
                              None if separate else encoder.backbone, on_step)
        lines += [f"{who}: target layer `{name}`; maps are scaled to [0, 1] per case. Centre of mass and peak in "
                  f"pixels of the {spec.size[1]}x{spec.size[0]} input.", ""]
    write_rows(out / "gradcam.csv", rows)
    if rows:
        lines += [markdown_table(rows, digits=1), ""]
        lines += [f"![{r['site']} {r['case_id']} {r['modality']}]({r['png']})" for r in rows]
    return lines + [""]


def _gradcam_rows(model: torch.nn.Module, data: dict[str, tuple[Any, dict[str, torch.Tensor]]], schema: Schema,
                  out: Path, n_cases: int, modality: str, layer: torch.nn.Module,
                  shared_backbone: torch.nn.Module | None,
                  on_step: StepCallback | None = None) -> list[dict[str, Any]]:
    """Up to ``n_cases`` maps per site for one image modality, each saved as a PNG overlay."""
    rows = []
    suffix = "" if modality == "image" else "-" + modality.split(":", 1)[1]
    for number, (site, (test, tensors)) in enumerate(data.items(), start=1):
        report(on_step, f"Grad-CAM {modality}", number, len(data), unit="site", detail=str(site))
        have = np.flatnonzero(tensors["mask"][:, schema.modalities.index(modality)].numpy())[:n_cases]
        if len(have) == 0:
            continue
        batch = {k: v[torch.from_numpy(have)] for k, v in tensors.items()}
        cams, targets = grad_cam(model, batch, layer, target=_explained_class(schema), key=modality,
                                 backbone=shared_backbone)
        frame = test.manifest.frame
        for k, (row, cam, target) in enumerate(zip(have, cams, targets, strict=True)):
            case = str(frame["case_id"].iloc[int(test.rows[row])])
            explained = schema.classes[int(target)] if target >= 0 else "risk"
            truth = schema.classes[int(batch["label"][k])] if schema.has_classification else ""
            title = (f"site {site}, case {case}{suffix.replace('-', ', ')}: explains '{explained}'"
                     + (f" (true: {truth})" if truth else ""))
            path = save_overlay(batch[modality][k].numpy(), cam, out / "gradcam" / f"site-{site}-{case}{suffix}.png",
                                title)
            cx, cy = cam_centroid(cam)
            py, px = np.unravel_index(int(cam.argmax()), cam.shape)
            rows.append({"site": site, "case_id": case, "modality": modality, "explained": explained, "label": truth,
                         "centroid_x": cx, "centroid_y": cy, "peak_x": int(px), "peak_y": int(py),
                         "png": path.relative_to(out).as_posix()})
    return rows


def _explained_class(schema: Schema) -> int | None:
    """The class every Grad-CAM explains: the positive class (the second, as for the AUC) of a binary
    task, else each case's predicted class.

    Why not always the predicted class: for a case predicted negative the map shows where the
    *negative* evidence is, and in an image that is often the absence of the lesion -- on
    wdbc-multimodal a 'benign' map is a ring on the background around a small nucleus -- which
    reads as "the model looks beside the nucleus". The positive class's map answers the question a
    clinician asks of every case: where is the evidence for disease.
    """
    if schema.has_classification and len(schema.classes) == 2:
        return 1
    return None


def _importance_section(model: torch.nn.Module, data: dict[str, tuple[Any, dict[str, torch.Tensor]]], schema: Schema,
                        out: Path, n_repeats: int, max_features: int, seed: int, device: str,
                        on_step: StepCallback | None = None) -> list[str]:
    metric = primary_metric(schema)
    lines = ["## Permutation importance", ""]
    omics = None
    if schema.omics and len(schema.omics) > max_features:
        report(on_step, "screening omics features", detail=f"keeping {max_features} of {len(schema.omics)}")
        omics = screen_omics(model, [t for _, t in data.values()], schema, max_features)
        lines += [f"{len(schema.omics)} omics features: the {max_features} with the largest mean |gradient x input| "
                  "were permuted.", ""]
    rows = []
    for k, (site, (_, tensors)) in enumerate(data.items()):
        for r in permutation_importance(model, tensors, schema, n_repeats=n_repeats, seed=seed + k, omics=omics,
                                        device=device, on_step=on_step,
                                        stage=f"permutation importance site {site} ({k + 1}/{len(data)})"):
            rows.append({"site": site, **r})
    overall = []
    for key in dict.fromkeys((r["modality"], r["feature"]) for r in rows):
        values = [r["importance_mean"] for r in rows if (r["modality"], r["feature"]) == key]
        finite = [v for v in values if not math.isnan(v)]
        overall.append({"site": "all sites", "modality": key[0], "feature": key[1], "metric": metric,
                        "importance_mean": float(np.mean(finite)) if finite else math.nan,
                        "importance_sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan,
                        "n_sites": len(finite)})
    write_rows(out / "permutation_importance.csv", rows + overall)
    ranked = sorted((r for r in overall if r["feature"] != "*" and not math.isnan(r["importance_mean"])),
                    key=lambda r: -r["importance_mean"])[:20]
    whole = [r for r in overall if r["feature"] == "*"]
    if ranked:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(ranked) + 1.5))
        names = [f"{r['feature']} ({r['modality']})" for r in ranked][::-1]
        ax.barh(names, [r["importance_mean"] for r in ranked][::-1],
                xerr=np.nan_to_num([r["importance_sd"] for r in ranked][::-1]), capsize=2, color="#4477aa")
        ax.set(xlabel=f"drop in test {metric} when shuffled (mean over sites; bars: sd over sites)",
               title="permutation importance")
        fig.tight_layout()
        fig.savefig(out / "permutation_importance.png", dpi=110)
        plt.close(fig)
    table = [{"feature": r["feature"], "modality": r["modality"], "drop (mean over sites)": r["importance_mean"],
              "sd over sites": r["importance_sd"]} for r in ranked[:15]]
    lines += [f"Drop of each site's test {metric} when a feature is shuffled among its test rows ({n_repeats} "
              "repeats); per-site values in `permutation_importance.csv`.", "",
              "Whole modalities:", "", markdown_table([{"modality": r["modality"], "drop": r["importance_mean"],
                                                        "sd over sites": r["importance_sd"]} for r in whole], digits=3),
              "", "Top features:", "", markdown_table(table, digits=3), ""]
    if ranked:
        lines += ["![permutation importance](permutation_importance.png)", ""]
    return lines
