"""Pooled and local-only training: the baseline every federated result is compared with.

``fedfusion train-local`` and the experiment runner both call :func:`run_local_training`, so the
pooled model, each site's local-only model and the federated clients share one preprocessing
path and one training loop (FLamby's protocol).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfusion.common.config import ModelConfig, Schema, TrainConfig
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.manifest import Manifest, load_manifest
from fedfusion.common.models import create_model
from fedfusion.common.plots import plot_curves, plot_km_by_risk, plot_roc
from fedfusion.common.results import write_rows
from fedfusion.common.training import (
    LossFunction,
    class_weights_for,
    fit,
    make_loader,
    metrics_from,
    pick_device,
    predict,
    primary_metric,
    seed_everything,
)


@dataclass
class LocalResult:
    """Test metrics of one trained model, plus where its files went."""

    test: dict[str, float]
    best_epoch: int
    history: list[dict[str, float]]
    model: torch.nn.Module
    preprocessor: Preprocessor
    out_dir: Path | None = None


def assign_split(manifest: Manifest, seed: int, test_fraction: float = 0.2, val_fraction: float = 0.1) -> None:
    """Give a manifest without a split column a seeded, stratified train/val/test split (in place)."""
    schema = manifest.schema
    frame = manifest.frame
    if schema.has_classification:
        strata = frame["label"].astype(str)
    else:
        strata = frame["event"].astype(int).astype(str)
    if "site" in frame.columns:
        strata = frame["site"].astype(str) + "|" + strata
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * len(frame), dtype=object)
    for _, idx in frame.groupby(strata).indices.items():
        idx = rng.permutation(idx)
        n_test = int(round(test_fraction * len(idx)))
        n_val = int(round(val_fraction * (len(idx) - n_test)))
        split[idx[:n_test]] = "test"
        split[idx[n_test:n_test + n_val]] = "val"
    frame["split"] = split


def run_local_training(
    manifest: Manifest,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    *,
    out_dir: Path | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> LocalResult:
    """Fit on the manifest's train split (early stopping on val), score on its test split.

    With ``out_dir`` it writes ``metrics.json``, ``history.csv``, ``model.pt`` (weights, schema,
    configs, preprocessing statistics) and a ROC or Kaplan-Meier PNG.
    """
    schema = manifest.schema
    seed_everything(train_cfg.seed)
    pre = Preprocessor.fit(manifest)
    train_set = MultimodalDataset(manifest, pre, "train", train_augment=train_cfg.augment, seed=train_cfg.seed)
    val_rows = manifest.rows("val")
    val_set = MultimodalDataset(manifest, pre, "val") if len(val_rows) else None
    test_set = MultimodalDataset(manifest, pre, "test")
    if len(test_set) == 0:
        raise ValueError(f"{manifest.path}: no rows in the 'test' split; nothing to score the model on")
    weights = None
    if schema.has_classification and train_cfg.class_weighted:
        weights = class_weights_for(train_set.labels, schema.num_classes)
    loss_fn = LossFunction(schema, weights)
    model = create_model(schema, model_cfg)
    bs = train_cfg.batch_size
    train_loader = make_loader(train_set, bs, shuffle=True, seed=train_cfg.seed)
    val_loader = make_loader(val_set, 256, shuffle=False) if val_set is not None else None
    result = fit(model, train_loader, val_loader, train_cfg, loss_fn, on_epoch=on_epoch)
    pred = predict(model, make_loader(test_set, 256, shuffle=False), loss_fn, pick_device(train_cfg.device))
    test = metrics_from(pred)
    local = LocalResult(test=test, best_epoch=result.best_epoch, history=result.history, model=model,
                        preprocessor=pre, out_dir=out_dir)
    if out_dir is not None:
        _write_outputs(out_dir, local, model, schema, model_cfg, train_cfg, pre, pred)
    return local


def _write_outputs(out_dir: Path, result: LocalResult, model: torch.nn.Module, schema: Schema,
                   model_cfg: ModelConfig, train_cfg: TrainConfig, pre: Preprocessor, pred: Any) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "schema": schema.name,
        "modalities": list(schema.modalities),
        "primary_metric": primary_metric(schema),
        "test": result.test,
        "best_epoch": result.best_epoch,
        "model": asdict(model_cfg),
        "train": asdict(train_cfg),
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    write_rows(out_dir / "history.csv", result.history)
    torch.save({"state_dict": model.state_dict(), "schema": schema.to_dict(), "model_config": asdict(model_cfg),
                "preprocessor": pre.to_dict()}, out_dir / "model.pt")
    keys = [k for k in ("train_loss", "val_loss") if any(k in r for r in result.history)]
    plot_curves(result.history, "epoch", keys, out_dir / "loss.png", title="loss per epoch")
    if pred.probs is not None:
        plot_roc(pred.labels, pred.probs, schema.classes, out_dir / "roc.png", title=f"{schema.name}: test ROC")
    if pred.risk is not None:
        plot_km_by_risk(pred.time, pred.event, pred.risk, out_dir / "km.png", title=f"{schema.name}: test KM")


def load_for_training(manifest_path: Path, schema: Schema, seed: int, modalities: Sequence[str] | None = None,
                      site: str | None = None, resplit: bool = False) -> Manifest:
    """Load + validate a manifest; optional modality restriction, site filter and split assignment.

    ``resplit`` replaces the manifest's split by a fresh seeded one (repeated hold-out over seeds).
    """
    if modalities:
        schema = schema.with_modalities(tuple(modalities))
    manifest = load_manifest(manifest_path, schema, check_images=False)
    if site is not None:
        if "site" not in manifest.frame.columns:
            raise ValueError(f"{manifest_path}: --site given but the manifest has no 'site' column")
        keep = manifest.frame["site"] == site
        if not keep.any():
            sites = sorted(manifest.frame["site"].unique())
            raise ValueError(f"{manifest_path}: no rows for site {site!r}; sites are {sites}")
        manifest.frame = manifest.frame[keep].reset_index(drop=True)
    if resplit or not manifest.has_split_column:
        assign_split(manifest, seed)
    return manifest
