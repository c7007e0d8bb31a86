"""A site's runtime: its validated manifest, datasets and device, loaded once per process.

Flower may start a fresh ClientApp process per message (deployment) or keep one per virtual
node (simulation); either way the manifest is read and validated once per process and cached,
since re-reading and re-decoding images every round would dominate a round's time.

Where the site's data comes from:
- deployment: the SuperNode's node config names it
  (``--node-config 'manifest="/data/site.csv" schema="/kit/schema.json" site-id="A"'``);
- simulation: ``partition-id`` picks one of the run config's ``sites`` and its manifest
  ``<data-dir>/site-<name>.csv``;
- scale simulation (``scale-sites`` > 0): ``partition-id`` is a virtual site whose rows are drawn on
  demand from the pooled ``<data-dir>/manifest.csv`` (``simulations/scale_sites.py``); at most
  ``scale-cache-size`` such runtimes stay built per process, however many sites the run has.

The site's privacy policy comes the same two ways (:func:`site_policy`): ``privacy-*`` node-config
keys written by ``fedfusion site start`` from ``site.toml``'s ``[privacy]`` table, or, for simulated
sites, the run config's ``sim-privacy-policy`` file. With sample-level DP a round is charged to the
site's ledger before it trains (:meth:`SiteRuntime.train`), so an update never leaves uncounted.
"""

from __future__ import annotations

import logging
import time
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fedfusion.client.ledger import PrivacyLedger
from fedfusion.common.config import ConfigError, ModelConfig, Schema, TrainConfig, load_schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.manifest import Manifest, load_manifest
from fedfusion.common.metrics import metric_interval
from fedfusion.common.models import create_model
from fedfusion.common.privacy import calibrate_noise, dp_schedule, make_private
from fedfusion.common.privacy_policy import (
    LEDGER_FILENAME,
    PrivacyPolicy,
    PrivacyTerms,
    negotiate,
    simulated_site_policy,
)
from fedfusion.common.records import (
    EPSILON_KEY,
    NOISE_ASKED_KEY,
    NOISE_KEY,
    NUM_EXAMPLES,
    VAL_COUNT_KEY,
    VAL_PREFIX,
    modality_count_key,
)
from fedfusion.common.training import (
    LossFunction,
    class_weights_for,
    make_loader,
    make_optimizer,
    metrics_from,
    pick_device,
    predict,
    primary_metric,
    seed_everything,
    train_epochs,
)
from fedfusion.simulations.scale_sites import BoundedRuntimeCache, ScaleSiteSource, build_virtual_site

log = logging.getLogger("fedfusion.client.runtime")


def round_schedule(cfg: TrainConfig, server_round: int) -> dict[str, int]:
    """Where round ``server_round`` sits on the learning-rate schedule: rounds, not local epochs,
    are the schedule's unit in a federation (every site uses one lr for its whole round)."""
    return {"step": server_round - 1, "total": max(cfg.lr_horizon, server_round)}


def site_manifest_path(data_dir: str | Path, site: str) -> Path:
    """Where a simulated site's manifest lives (beside the pooled one, so image paths stay inside)."""
    return Path(data_dir) / f"site-{site}.csv"


@dataclass(frozen=True)
class RoundPrivacy:
    """The sample-level DP one round trains under and the ledger it is charged to.

    ``rounds_left`` (this round included) is what the site calibrates noise for, so that the run's
    planned rounds end at or under the budget; ``note`` (run id, round) is written with the charge.
    """

    terms: PrivacyTerms
    ledger: PrivacyLedger
    study: str
    rounds_left: int = 1
    note: Mapping[str, Any] = field(default_factory=dict)
    run_rounds: int = 0  # the run's planned rounds (0: unknown, use rounds_left): the σ the run asks is for all

    def asked_noise(self, sample_rate: float, steps: int) -> float:
        """σ this run's whole plan needs from an *unspent* budget (or the fixed σ the run asks, at least the
        policy's floor). A charge well above it means earlier spending forced more noise on this round."""
        terms = self.terms
        if terms.noise_multiplier is not None:
            return max(terms.noise_multiplier, terms.min_noise_multiplier)
        planned = steps * max(self.run_rounds or self.rounds_left, 1)
        return calibrate_noise([], sample_rate, planned, terms.epsilon_cap, terms.delta, self.ledger.accountant,
                               floor=terms.min_noise_multiplier)

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.study, self.terms.delta)


#: A site whose σ exceeds the run's asked σ by more than this factor trains a mostly-noise update.
NOISE_WARNING_RATIO = 2.0


def _log_noise(site: str, server_round: int, sigma: float, asked: float, epsilon_before: float, cap: float) -> None:
    """Say at the site which σ it trains with; warn when spent budget forced far more than the run asks."""
    if asked > 0 and sigma > NOISE_WARNING_RATIO * asked:
        log.warning("site %s, round %d: training with noise multiplier σ %.3g (the run asks %.3g): ε %.3g of %.3g "
                    "was already spent on this study, so this update is mostly noise", site, server_round, sigma,
                    asked, epsilon_before, cap)
    else:
        log.info("site %s, round %d: DP-SGD with noise multiplier σ %.3g (the run asks %.3g)", site, server_round,
                 sigma, asked)


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
    val_set: MultimodalDataset | None = None  # the manifest's "val" rows; scores each round for model selection
    # Virtual sites (scale mode) share one model object per process: every message loads the server's
    # full state dict into it, so building the architecture again per site only costs time.
    reuse_model: bool = False

    @property
    def seed_offset(self) -> int:
        """A stable per-site number, so each site's randomness differs but reproduces."""
        return zlib.crc32(self.site_id.encode()) % 100_000

    def build_model(self, cfg: ModelConfig, *, fresh: bool = False) -> torch.nn.Module:
        """The run's architecture (freezing included); its weights always arrive from the server, so
        ``pretrained_path`` is not read here: only the coordinator needs the weights file.

        ``fresh`` forces a new object even for a virtual site (DP-SGD attaches Opacus hooks to it).
        A reused model is only correct because the caller loads every weight and buffer into it
        strictly (``arrays_to_model``) before use.
        """
        cfg = replace(cfg, pretrained_path=None)
        if not self.reuse_model or fresh:
            return create_model(self.schema, cfg)
        key = (id(self.schema), cfg)
        if _SHARED_MODEL.get("key") != key:
            _SHARED_MODEL.clear()
            _SHARED_MODEL.update(key=key, model=create_model(self.schema, cfg), schema=self.schema)
        return _SHARED_MODEL["model"]

    def train(self, model: torch.nn.Module, cfg: TrainConfig, server_round: int,
              proximal_mu: float = 0.0, privacy: RoundPrivacy | None = None) -> dict[str, float]:
        """Local epochs from the global weights; returns the counts and losses the server may see.

        With ``privacy`` the epochs run DP-SGD, charged to the ledger first: raises
        :class:`~fedfusion.common.privacy_policy.BudgetExceeded` (nothing trained) when they do not fit.
        """
        if privacy is not None:
            return self._train_private(model, cfg, server_round, proximal_mu, privacy)
        seed_everything(cfg.seed * 1_000_003 + server_round * 1_009 + self.seed_offset)
        weights = None
        if self.schema.has_classification and cfg.class_weighted:
            weights = class_weights_for(self.train_set.labels, self.schema.num_classes)
        loss_fn = LossFunction(self.schema, weights)
        loader = make_loader(self.train_set, cfg.batch_size, shuffle=True,
                             seed=cfg.seed + server_round * 7919 + self.seed_offset)
        optimizer = make_optimizer(model, cfg, **round_schedule(cfg, server_round))
        began = time.perf_counter()
        losses = train_epochs(model, loader, optimizer, loss_fn, cfg.epochs, self.device,
                              proximal_mu=proximal_mu, start_epoch=(server_round - 1) * cfg.epochs)
        model.to("cpu")
        return {NUM_EXAMPLES: len(self.train_set), "loss": losses[-1], "train-seconds": time.perf_counter() - began,
                **{modality_count_key(m): c for m, c in self.modality_counts.items()}}

    def _train_private(self, model: torch.nn.Module, cfg: TrainConfig, server_round: int, proximal_mu: float,
                       privacy: RoundPrivacy) -> dict[str, float]:
        # Model-side randomness (modality dropout, augmentation) stays seeded; the noise and the Poisson
        # sampling draw from os.urandom inside make_private, so DP rounds are not bit-reproducible.
        seed_everything(cfg.seed * 1_000_003 + server_round * 1_009 + self.seed_offset)
        terms = privacy.terms
        sample_rate, steps_per_epoch = dp_schedule(len(self.train_set), cfg.batch_size)
        steps = steps_per_epoch * cfg.epochs
        charge = privacy.ledger.charge(privacy.study, sample_rate=sample_rate, steps=steps, terms=terms,
                                       planned_steps=steps * max(privacy.rounds_left, 1),
                                       note={**privacy.note, "site": self.site_id})
        asked = privacy.asked_noise(sample_rate, steps)
        _log_noise(self.site_id, server_round, charge.noise_multiplier, asked, charge.epsilon_before,
                   charge.epsilon_cap)
        # No class weights: they are computed from every training label and would couple each case's
        # loss to the others' labels, outside what per-sample clipping bounds.
        loss_fn = LossFunction(self.schema)
        began = time.perf_counter()
        optimizer = make_optimizer(model, cfg, **round_schedule(cfg, server_round))  # Opacus keeps its lr
        private = make_private(model, self.train_set, optimizer, loss_fn, batch_size=cfg.batch_size,
                               noise_multiplier=charge.noise_multiplier, max_grad_norm=terms.max_grad_norm,
                               accountant=privacy.ledger.accountant, grad_sample_mode=terms.grad_sample_mode,
                               physical_batch_size=terms.physical_batch_size, device=self.device,
                               proximal_mu=proximal_mu, separable_loss=not self.schema.has_survival,
                               num_workers=cfg.num_workers)
        try:
            with warnings.catch_warnings():  # Opacus' hooks on the first layer; its functorch path's autocast
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                warnings.filterwarnings("ignore", message="In CPU autocast")
                train_epochs(private.module, private.loader, private.optimizer, private.loss_fn, cfg.epochs,
                             self.device, start_epoch=(server_round - 1) * cfg.epochs, amp=False,
                             on_empty_batch=private.empty_step)
        finally:
            private.close()
        taken = private.steps_taken()
        if taken > steps:  # cannot happen with Opacus' Poisson loader; if it ever does, count it before sending
            privacy.ledger.record(privacy.study, charge.noise_multiplier, sample_rate, taken - steps,
                                  note={**privacy.note, "site": self.site_id, "reason": "steps beyond the charge"})
        model.to("cpu")
        # No training loss: it is computed from the sampled cases without noise, so sending it would release
        # something the ledger's ε does not cover. Counts and the DP settings are what the server needs.
        return {NUM_EXAMPLES: len(self.train_set), "train-seconds": time.perf_counter() - began,
                **{modality_count_key(m): c for m, c in self.modality_counts.items()},
                EPSILON_KEY: privacy.epsilon(), "delta": terms.delta, "epsilon-budget": terms.epsilon_cap,
                NOISE_KEY: charge.noise_multiplier, NOISE_ASKED_KEY: asked, "max-grad-norm": terms.max_grad_norm,
                "sample-rate": sample_rate, "dp-steps": taken}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Metrics of the global model on this site's test split (aggregates only, no predictions).

        With a validation split, also its primary metric and loss (``val_auc``/``val_c_index``,
        ``val_loss``) and its size: the server picks the delivered round by these, never by test.
        """
        loss_fn = LossFunction(self.schema)
        pred = predict(model, make_loader(self.test_set, 256, shuffle=False), loss_fn, self.device)
        out = {NUM_EXAMPLES: len(self.test_set), **metrics_from(pred)}
        # a 95 % bootstrap interval of the primary metric: the report's per-site error bars (aggregates only)
        out.update(metric_interval(primary_metric(self.schema), labels=pred.labels, probs=pred.probs, time=pred.time,
                                   event=pred.event, risk=pred.risk, seed=self.seed_offset))
        if self.val_set is not None and len(self.val_set):
            val = metrics_from(predict(model, make_loader(self.val_set, 256, shuffle=False), loss_fn, self.device))
            metric = primary_metric(self.schema)
            out.update({VAL_COUNT_KEY: len(self.val_set), f"{VAL_PREFIX}loss": val["loss"]})
            if metric in val:
                out[f"{VAL_PREFIX}{metric}"] = val[metric]
        model.to("cpu")
        return out


@lru_cache(maxsize=8)
def load_site(manifest_path: str, schema_path: str, site_id: str, device: str = "auto") -> SiteRuntime:
    """Validate the manifest and build datasets once per process (cached by arguments)."""
    schema = load_schema(schema_path)
    manifest = load_manifest(manifest_path, schema, check_images=False)
    pre = Preprocessor.fit(manifest)
    train_set = MultimodalDataset(manifest, pre, "train", train_augment=True)
    test_set = MultimodalDataset(manifest, pre, "test")
    val_set = MultimodalDataset(manifest, pre, "val") if len(manifest.rows("val")) else None
    present = manifest.modality_present().iloc[manifest.rows("train")]
    counts = {m: int(present[m].sum()) for m in schema.modalities}
    return SiteRuntime(site_id=site_id, schema=schema, manifest=manifest, device=pick_device(device),
                       preprocessor=pre, train_set=train_set, test_set=test_set, modality_counts=counts,
                       val_set=val_set)


def site_from_context(node_config: dict[str, Any], run_config: dict[str, Any]) -> SiteRuntime:
    """Resolve which site this process is, from the node config (deployment) or partition id."""
    device = str(node_config.get("device", "auto"))
    if "manifest" in node_config:
        if not isinstance(node_config["manifest"], str) or not node_config["manifest"].strip():
            raise ConfigError(f"node config manifest must be the path of the site's CSV file, "
                              f"got {node_config['manifest']!r}")
        schema = str(node_config.get("schema") or run_config.get("schema", ""))
        if not schema:
            raise ConfigError("node config names a manifest but no schema; add schema=\"/path/schema.json\"")
        site_id = str(node_config.get("site-id", Path(str(node_config["manifest"])).stem))
        return load_site(str(node_config["manifest"]), schema, site_id, device)
    if "partition-id" in node_config:
        sites = [s for s in str(run_config.get("sites", "")).split(",") if s]
        partition = node_config["partition-id"]
        if isinstance(partition, str) and partition.strip().isdigit():
            partition = int(partition)
        if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
            raise ConfigError(f"node config partition-id must be a whole number >= 0, got {partition!r}")
        if int(run_config.get("scale-sites", 0) or 0) > 0:
            return virtual_site(run_config, partition, device)
        missing = [key for key in ("data-dir", "schema") if not run_config.get(key)]
        if missing:
            raise ConfigError(f"simulation partition {partition}: run config needs {missing}")
        if partition >= len(sites):
            raise ConfigError(f"simulation partition {partition} has no site; run config 'sites' lists {sites}")
        site = sites[partition]
        manifest = site_manifest_path(str(run_config["data-dir"]), site)
        return load_site(str(manifest), str(run_config["schema"]), site, device)
    raise ConfigError("this SuperNode has no site data: start it with --node-config "
                      "'manifest=\"/path/site.csv\" schema=\"/path/schema.json\" site-id=\"NAME\"'")


#: The one model object virtual sites of this process share (``SiteRuntime.reuse_model``); the
#: schema is kept alongside so that ``id(schema)`` in the key cannot be reused by another object.
_SHARED_MODEL: dict[str, Any] = {}

#: Runtimes of virtual sites (scale mode) in this process; bounded by ``scale-cache-size``.
_VIRTUAL_SITES = BoundedRuntimeCache(1)


def virtual_site(run_config: Mapping[str, Any], partition: int, device: str = "auto") -> SiteRuntime:
    """Scale mode: virtual site ``partition``, drawn from the pooled manifest and built on demand
    (``simulations/scale_sites.py``); at most ``scale-cache-size`` of them stay built per process."""
    source = ScaleSiteSource.from_run_config(run_config)
    assert source is not None  # the caller checked scale-sites > 0
    return _VIRTUAL_SITES.get((source, partition, device), lambda: build_virtual_site(source, partition, device),
                              size=source.cache_size)


def resident_site_runtimes() -> int:
    """Site runtimes this process holds now (real sites' ``load_site`` cache plus virtual sites)."""
    return load_site.cache_info().currsize + len(_VIRTUAL_SITES)


def site_policy(node_config: Mapping[str, Any], run_config: Mapping[str, Any], site_id: str) -> PrivacyPolicy:
    """This site's privacy policy: node config (``site start`` writes it from site.toml), or the
    simulation's ``sim-privacy-policy`` file; the ledger defaults to a file beside the site's data."""
    if "manifest" in node_config:
        default = Path(str(node_config["manifest"])).resolve().parent / LEDGER_FILENAME
        return PrivacyPolicy.from_node_config(node_config, default_ledger=default)
    policy_file = str(run_config.get("sim-privacy-policy", "") or "")
    if policy_file:
        return simulated_site_policy(policy_file, site_id)
    data_dir = Path(str(run_config.get("data-dir", "") or "."))
    return PrivacyPolicy(ledger=str(data_dir.resolve() / f"privacy-ledger-{site_id}.json"))


def study_name(cfg: FederationConfig, schema: Schema) -> str:
    """The ledger key ε is budgeted under: the run's ``study``, else the federation schema's name, so
    that runs over the same data contract share one budget unless the coordinator names studies."""
    return cfg.study or f"schema:{schema.name}"


def round_privacy(site: SiteRuntime, policy: PrivacyPolicy, cfg: FederationConfig, server_round: int,
                  note: Mapping[str, Any] | None = None) -> RoundPrivacy | None:
    """The round's DP terms (None: no sample-level DP); raises PrivacyError when the site refuses."""
    terms = negotiate(policy, cfg.privacy)
    if terms is None:
        return None
    return RoundPrivacy(terms=terms, ledger=PrivacyLedger.for_policy(policy, site.site_id),
                        study=study_name(cfg, site.schema), rounds_left=max(cfg.num_rounds - server_round + 1, 1),
                        note=dict(note or {}), run_rounds=cfg.num_rounds)
