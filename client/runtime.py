"""A site's runtime: its validated manifest, datasets and device, loaded once per process.

Flower may start a fresh ClientApp process per message (deployment) or keep one per virtual
node (simulation); either way the manifest is read and validated once per process and cached,
since re-reading and re-decoding images every round would dominate a round's time.

Where the site's data comes from:
- deployment: the SuperNode's node config names it
  (``--node-config 'manifest="/data/site.csv" schema="/kit/schema.json" site-id="A"'``);
- simulation: ``partition-id`` picks one of the run config's ``sites`` and its manifest
  ``<data-dir>/site-<name>.csv``.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fedfusion.common.config import ConfigError, ModelConfig, Schema, TrainConfig, load_schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.manifest import Manifest, load_manifest
from fedfusion.common.models import create_model
from fedfusion.common.records import NUM_EXAMPLES, modality_count_key
from fedfusion.common.training import (
    LossFunction,
    class_weights_for,
    make_loader,
    make_optimizer,
    metrics_from,
    pick_device,
    predict,
    seed_everything,
    train_epochs,
)


def site_manifest_path(data_dir: str | Path, site: str) -> Path:
    """Where a simulated site's manifest lives (beside the pooled one, so image paths stay inside)."""
    return Path(data_dir) / f"site-{site}.csv"


@dataclass
class SiteRuntime:
    """Everything a site needs to train and evaluate; nothing here is ever sent to the server."""

    site_id: str
    schema: Schema
    manifest: Manifest
    device: torch.device
    preprocessor: Preprocessor
    train_set: MultimodalDataset
    test_set: MultimodalDataset
    modality_counts: dict[str, int] = field(default_factory=dict)

    @property
    def seed_offset(self) -> int:
        """A stable per-site number, so each site's randomness differs but reproduces."""
        return zlib.crc32(self.site_id.encode()) % 100_000

    def build_model(self, cfg: ModelConfig) -> torch.nn.Module:
        return create_model(self.schema, cfg)

    def train(self, model: torch.nn.Module, cfg: TrainConfig, server_round: int,
              proximal_mu: float = 0.0) -> dict[str, float]:
        """Local epochs from the global weights; returns the counts and losses the server may see."""
        seed_everything(cfg.seed * 1_000_003 + server_round * 1_009 + self.seed_offset)
        weights = None
        if self.schema.has_classification and cfg.class_weighted:
            weights = class_weights_for(self.train_set.labels, self.schema.num_classes)
        loss_fn = LossFunction(self.schema, weights)
        loader = make_loader(self.train_set, cfg.batch_size, shuffle=True,
                             seed=cfg.seed + server_round * 7919 + self.seed_offset)
        optimizer = make_optimizer(model, cfg)
        began = time.perf_counter()
        losses = train_epochs(model, loader, optimizer, loss_fn, cfg.epochs, self.device,
                              proximal_mu=proximal_mu, start_epoch=(server_round - 1) * cfg.epochs)
        model.to("cpu")
        return {NUM_EXAMPLES: len(self.train_set), "loss": losses[-1], "train-seconds": time.perf_counter() - began,
                **{modality_count_key(m): c for m, c in self.modality_counts.items()}}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics of the global model on this site's test split (aggregates only, no predictions)."""
        loss_fn = LossFunction(self.schema)
        pred = predict(model, make_loader(self.test_set, 256, shuffle=False), loss_fn, self.device)
        model.to("cpu")
        return {NUM_EXAMPLES: len(self.test_set), **metrics_from(pred)}


@lru_cache(maxsize=8)
def load_site(manifest_path: str, schema_path: str, site_id: str, device: str = "auto") -> SiteRuntime:
    """Validate the manifest and build datasets once per process (cached by arguments)."""
    schema = load_schema(schema_path)
    manifest = load_manifest(manifest_path, schema, check_images=False)
    pre = Preprocessor.fit(manifest)
    train_set = MultimodalDataset(manifest, pre, "train", train_augment=True)
    test_set = MultimodalDataset(manifest, pre, "test")
    present = manifest.modality_present().iloc[manifest.rows("train")]
    counts = {m: int(present[m].sum()) for m in schema.modalities}
    return SiteRuntime(site_id=site_id, schema=schema, manifest=manifest, device=pick_device(device),
                       preprocessor=pre, train_set=train_set, test_set=test_set, modality_counts=counts)


def site_from_context(node_config: dict[str, Any], run_config: dict[str, Any]) -> SiteRuntime:
    """Resolve which site this process is, from the node config (deployment) or partition id."""
    device = str(node_config.get("device", "auto"))
    if "manifest" in node_config:
        schema = str(node_config.get("schema") or run_config.get("schema", ""))
        if not schema:
            raise ConfigError("node config names a manifest but no schema; add schema=\"/path/schema.json\"")
        site_id = str(node_config.get("site-id", Path(str(node_config["manifest"])).stem))
        return load_site(str(node_config["manifest"]), schema, site_id, device)
    if "partition-id" in node_config:
        sites = [s for s in str(run_config.get("sites", "")).split(",") if s]
        partition = int(node_config["partition-id"])
        if partition >= len(sites):
            raise ConfigError(f"simulation partition {partition} has no site; run config 'sites' lists {sites}")
        site = sites[partition]
        manifest = site_manifest_path(str(run_config["data-dir"]), site)
        return load_site(str(manifest), str(run_config["schema"]), site, device)
    raise ConfigError("this SuperNode has no site data: start it with --node-config "
                      "'manifest=\"/path/site.csv\" schema=\"/path/schema.json\" site-id=\"NAME\"'")
