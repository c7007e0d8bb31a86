"""``fedfusion simulate``: real shipped data split into sites, Flower's simulation runtime trains
the shared model, and a report compares FedAvg with pooled and local-only training per site.

Flower's simulation runtime (Ray) runs the same ClientApp/ServerApp as a real deployment; the
runner gives every virtual site one CPU (or a GPU share) and never installs dependencies at run
time. Baselines use the same preprocessing and training code as the federated sites (FLamby).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfusion.common.config import ConfigError, ModelConfig, TrainConfig, load_schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.manifest import Manifest, load_manifest
from fedfusion.common.personalization import PERSONALIZE_PRESETS, personal_view
from fedfusion.common.plots import chance_level, plot_bars
from fedfusion.common.progress import StepCallback, report
from fedfusion.common.results import markdown_table, write_json, write_rows
from fedfusion.common.training import (
    LossFunction,
    Predictions,
    make_loader,
    metrics_from,
    pick_device,
    predict,
    primary_metric,
)
from fedfusion.server.report import delivered_evaluations, final_site_metrics, rounds_table, site_test_sizes
from fedfusion.simulations.datasets import build_dataset
from fedfusion.simulations.local_training import run_local_training
from fedfusion.simulations.partition import partition_manifest
from fedfusion.simulations.runtime_notices import known_notices_hidden
from fedfusion.simulations.scale_sites import POOLED_MANIFEST
from fedfusion.simulations.user_sites import prepare_user_sites, split_lines

log = logging.getLogger("fedfusion.simulate")


@dataclass(frozen=True)
class SimulationSpec:
    """What a researcher chooses; everything else comes from the data set's schema."""

    dataset: str
    out_dir: Path
    partition: str = "natural"
    num_sites: int = 3
    rounds: int = 5
    strategy: str = "fedavg"
    fusion: str = "attention"
    image_backbone: str = "cnn_small"  # a registered name (plug-ins included) or timm:<model>; image data only
    local_epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    baselines: bool = True
    baseline_epochs: int = 30
    device: str = "cpu"
    cpus_per_site: int = 1
    gpus_per_site: float = 0.0
    # keyword options of partition_manifest (alpha, missing_modality, shift_feature, ...); see partition.py
    partition_options: dict[str, Any] = field(default_factory=dict)
    # Scale mode (simulations/scale_sites.py): > 0 virtual sites drawn from the pooled manifest on demand,
    # instead of `partition` into num_sites manifest files; baselines are skipped (no per-site files).
    scale_sites: int = 0
    rows_per_site: int = 50
    fraction_train: float = 1.0  # share of sites sampled to train each round (Flower samples them)
    fraction_evaluate: float = 1.0
    # An existing Ray cluster ("host:6379", "auto"); "" = the RAY_ADDRESS variable, else a private local Ray
    ray_address: str = ""
    # Your own data (simulations/user_sites.py): DIR/schema.json + DIR/<site>/manifest.csv instead of `dataset`
    sites_dir: Path | None = None
    # Experiment tracking (server/tracking.py): "tensorboard", "mlflow" or both; "" = the run-config defaults
    tracking: str = ""
    tracking_dir: str = ""
    mlflow_uri: str = ""
    # Personalisation (common/personalization.py PERSONALIZE_PRESETS): "" | "ft" (FedAvg+FT) | "fedper" | "ditto"
    personalize: str = ""


def prepare_sites(spec: SimulationSpec) -> tuple[Path, dict[str, Path]]:
    """Build the data set into ``out_dir/data`` and write one manifest per site (none in scale mode:
    virtual sites are drawn from the pooled manifest when they are sampled)."""
    data_dir = spec.out_dir / "data"
    if spec.sites_dir is not None:
        if spec.partition != "natural" or spec.scale_sites > 0:
            raise ConfigError("--sites-dir: the sub-folders are the sites; use the natural partition, no scale mode")
        schema_path, sites = prepare_user_sites(Path(spec.sites_dir), data_dir, spec.seed)
        return schema_path, sites
    schema_path = build_dataset(spec.dataset, data_dir, seed=spec.seed)
    schema = load_schema(schema_path)
    if spec.scale_sites > 0:
        pooled = load_manifest(data_dir / POOLED_MANIFEST, schema, check_images=False)
        if spec.rows_per_site > len(pooled):
            raise ConfigError(f"{pooled.path}: rows_per_site = {spec.rows_per_site} but the data set has only "
                              f"{len(pooled)} rows (rows are distinct within a virtual site)")
        return schema_path, {}
    sites = partition_manifest(data_dir / "manifest.csv", schema, spec.partition, spec.num_sites, spec.seed,
                               **spec.partition_options)
    for site, path in sites.items():  # fail here, with the file and line, not inside a Ray worker
        load_manifest(path, schema, check_images=False, allow_single_class=spec.partition != "natural")
        log.info("site %s: %s", site, path)
    return schema_path, sites


def num_simulated_sites(spec: SimulationSpec, sites: dict[str, Path]) -> int:
    """How many SuperNodes the simulation runtime starts: one per site file, or the virtual sites."""
    return spec.scale_sites if spec.scale_sites > 0 else len(sites)


def run_config_for(spec: SimulationSpec, schema_path: Path, sites: dict[str, Path]) -> dict[str, Any]:
    total = num_simulated_sites(spec, sites)
    # Flower samples max(fraction x available, min-sites) nodes, so min-sites must not exceed a sample.
    fractions = [f for f in (spec.fraction_train, spec.fraction_evaluate) if f > 0]
    min_sites = max(1, min(int(total * f) for f in fractions)) if fractions else total
    config = {
        "num-server-rounds": spec.rounds, "strategy": spec.strategy, "min-sites": min(min_sites, total),
        "seed": spec.seed, "schema": str(schema_path), "run-dir": str(spec.out_dir / "federated"),
        "data-dir": str(schema_path.parent), "sites": ",".join(sites), "fusion": spec.fusion,
        "image-backbone": spec.image_backbone,
        "local-epochs": spec.local_epochs, "local-batch-size": spec.batch_size, "local-lr": spec.lr,
        "local-device": spec.device, "fraction-train": spec.fraction_train,
        "fraction-evaluate": spec.fraction_evaluate,
    }
    if spec.scale_sites > 0:
        config.update({"scale-sites": spec.scale_sites, "scale-rows-per-site": spec.rows_per_site})
    tracking = {"tracking": spec.tracking, "tracking-dir": spec.tracking_dir, "mlflow-tracking-uri": spec.mlflow_uri}
    config.update({k: v for k, v in tracking.items() if v})
    if spec.personalize:
        if spec.personalize not in PERSONALIZE_PRESETS:
            raise ConfigError(f"personalize must be one of {sorted(PERSONALIZE_PRESETS)}, got {spec.personalize!r}")
        config.update(PERSONALIZE_PRESETS[spec.personalize])
    return config


def ray_init_args(ray_address: str = "", num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` arguments for Flower's Ray backend.

    With an address (argument, else the ``RAY_ADDRESS`` variable) the driver joins that existing
    cluster, whose resources were fixed by ``ray start``: Ray refuses ``num_cpus`` then ("When
    connecting to an existing cluster, num_cpus and num_gpus must not be provided"). Without one, a
    private Ray instance gets ``num_cpus`` cores (default: all of this machine's).
    """
    address = ray_address or os.environ.get("RAY_ADDRESS", "")
    args: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR"}
    if address:
        return {**args, "address": address}
    return {**args, "num_cpus": int(num_cpus or os.cpu_count() or 2)}


def run_simulated_federation(run_config: dict[str, Any], num_sites: int, *, cpus_per_site: int = 1,
                             gpus_per_site: float = 0.0,
                             on_round: Callable[[dict[str, Any]], None] | None = None,
                             ray_address: str = "", num_cpus: int | None = None) -> Any:
    """Run the ServerApp + ClientApps in Flower's simulation runtime; return the FederationResult.

    ``ray_address`` (or ``RAY_ADDRESS``) runs the sites on an existing Ray cluster (docs/ray-cluster.md);
    ``num_cpus`` caps a private local Ray (an existing cluster's size was fixed by ``ray start``).
    """
    from flwr.simulation import run_simulation

    from fedfusion.client.app import make_client_app
    from fedfusion.common.secagg.testbed import with_simulation_keys
    from fedfusion.server.app import make_server_app
    from fedfusion.server.tracking import check_tracking

    check_tracking(run_config)  # a missing extra fails here, not as "ended without a result" inside Flower
    box: dict[str, Any] = {}
    run_config = with_simulation_keys(run_config, num_sites)  # secure rounds: per-site keys and a roster
    server = make_server_app(run_config, on_round=on_round, on_done=lambda r: box.setdefault("result", r))
    client = make_client_app(run_config)
    backend = {"client_resources": {"num_cpus": int(cpus_per_site), "num_gpus": float(gpus_per_site)},
               "init_args": ray_init_args(ray_address, num_cpus)}
    with known_notices_hidden():  # Flower's deprecation of this function and Ray's GPU-env tip: nothing to act on
        run_simulation(server_app=server, client_app=client, num_supernodes=num_sites, backend_config=backend)
    if "result" not in box:
        raise RuntimeError("the simulated federation ended without a result; see the log above")
    return box["result"]


def federated_ended_early(out_dir: Path) -> str:
    """Why the federated run of ``out_dir`` stopped before its last round ("" when it did not).

    Read from the run folder's summary.json (server/report.py) so the command can exit non-zero: a
    report with fewer rounds than asked is not the job the researcher asked for.
    """
    summary = out_dir / "federated" / "summary.json"
    if not summary.is_file():
        return ""
    return str(json.loads(summary.read_text()).get("ended_early") or "")


def baseline_configs(spec: SimulationSpec) -> tuple[ModelConfig, TrainConfig]:
    """Model and training settings of the pooled and local-only baselines (early stopping on val)."""
    train_cfg = TrainConfig(epochs=spec.baseline_epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
                            device=spec.device)
    return ModelConfig(fusion=spec.fusion, image_backbone=spec.image_backbone), train_cfg


def score_site(model: torch.nn.Module, preprocessor: Preprocessor, manifest: Manifest, device: str = "cpu",
               split: str = "test") -> Predictions:
    """Predictions of ``model`` on one split of a site manifest, standardised with ``preprocessor``.

    The pooled model brings its own (pooled) statistics; a federated global model is scored with the
    site's own, as the site itself does in ``client.runtime``.
    """
    data = MultimodalDataset(manifest, preprocessor, split)
    return predict(model, make_loader(data, 256, shuffle=False), LossFunction(manifest.schema), pick_device(device))


def _epoch_reporter(on_step: StepCallback | None, stage: str, total: int, metric: str
                    ) -> Callable[[dict[str, float]], None] | None:
    """An ``on_epoch`` hook that reports ``stage epoch k/total`` with its losses (None: nobody listens)."""
    if on_step is None:
        return None

    def on_epoch(row: dict[str, float]) -> None:
        detail = f"loss {row['train_loss']:.3f}" if "train_loss" in row else ""
        if f"val_{metric}" in row:
            detail += f" val {metric} {row[f'val_{metric}']:.3f}"
        report(on_step, stage, int(row["epoch"]), total, unit="epoch", detail=detail.strip())

    return on_epoch


def run_baselines(spec: SimulationSpec, schema_path: Path, sites: dict[str, Path],
                  on_step: StepCallback | None = None) -> list[dict[str, Any]]:
    """Pooled and local-only models, each scored on every site's own test split.

    ``on_step`` hears ``baseline pooled`` then ``baseline local-only site S`` with epoch/total: these
    trainings take minutes after the last round, and early stopping may end a stage before ``total``."""
    schema = load_schema(schema_path)
    metric = primary_metric(schema)
    model_cfg, train_cfg = baseline_configs(spec)
    rows: list[dict[str, Any]] = []
    report(on_step, "baseline pooled", 0, train_cfg.epochs, unit="epoch", detail="all sites' training rows")
    pooled = run_local_training(load_manifest(schema_path.parent / "manifest.csv", schema, check_images=False),
                                model_cfg, train_cfg,
                                on_epoch=_epoch_reporter(on_step, "baseline pooled", train_cfg.epochs, metric))
    for site, path in sites.items():
        site_manifest = load_manifest(path, schema, check_images=False, allow_single_class=True)
        pred = score_site(pooled.model, pooled.preprocessor, site_manifest, spec.device)
        rows.append({"site": site, "method": "pooled", metric: metrics_from(pred).get(metric, float("nan"))})
        stage = f"baseline local-only site {site}"
        report(on_step, stage, 0, train_cfg.epochs, unit="epoch")
        local = run_local_training(site_manifest, model_cfg, train_cfg,
                                   on_epoch=_epoch_reporter(on_step, stage, train_cfg.epochs, metric))
        rows.append({"site": site, "method": "local-only", metric: local.test.get(metric, float("nan"))})
    return rows


def simulate(spec: SimulationSpec, on_round: Callable[[dict[str, Any]], None] | None = None,
             on_step: StepCallback | None = None) -> Path:
    """The whole study: sites, federation, baselines, report. Returns the report's path.

    ``on_round`` gets each round's metrics row; ``on_step`` hears the stages around the rounds
    (building sites, starting the runtime, each baseline's epochs, writing the report)."""
    spec = replace(spec, out_dir=spec.out_dir.resolve())
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    report(on_step, "building sites")
    schema_path, sites = prepare_sites(spec)
    schema = load_schema(schema_path)
    metric = primary_metric(schema)
    run_config = run_config_for(spec, schema_path, sites)
    report(on_step, "federation", 0, spec.rounds, unit="round",
           detail=f"{num_simulated_sites(spec, sites)} sites; starting Flower's simulation runtime, then round 0 "
                  "scores the initial model")
    result = run_simulated_federation(run_config, num_simulated_sites(spec, sites), cpus_per_site=spec.cpus_per_site,
                                      gpus_per_site=spec.gpus_per_site, on_round=on_round,
                                      ray_address=spec.ray_address)
    final = delivered_evaluations(result)  # model-selection: best federated validation round, or the last
    initial = {m["site"]: m.get(metric, float("nan")) for m in result.site_metrics
               if m["phase"] == "evaluate" and m["round"] == 0}
    comparison = [{"site": m["site"], "method": f"federated ({spec.strategy})", metric: m.get(metric, float("nan"))}
                  for m in final]
    if spec.personalize == "fedper":  # the sites evaluated with their own heads: that is the method's score
        for row in comparison:
            row["method"] = f"federated ({spec.strategy}) + private heads"
    elif spec.personalize in ("ft", "ditto"):
        label = "fine-tuning" if spec.personalize == "ft" else "Ditto personal models"
        comparison += [{"site": m["site"], "method": f"federated ({spec.strategy}) + {label}",
                        metric: personal_view(m, metric)[metric]} for m in final]
    comparison += [{"site": s, "method": "initial model (round 0)", metric: v} for s, v in initial.items()]
    if spec.baselines and spec.scale_sites == 0:
        comparison += run_baselines(spec, schema_path, sites, on_step)
    report(on_step, "writing report")
    return write_study_report(spec, schema.name, metric, comparison, result)


def write_study_report(spec: SimulationSpec, schema_name: str, metric: str, comparison: list[dict[str, Any]],
                       result: Any) -> Path:
    out = spec.out_dir
    write_rows(out / "comparison.csv", comparison)
    methods = list(dict.fromkeys(r["method"] for r in comparison))
    sites = list(dict.fromkeys(r["site"] for r in comparison))
    sizes = {r["site"]: r for r in site_test_sizes(final_site_metrics(result), metric)}
    table = []
    for site in sites:  # test n / events first: how far each site's numbers can be trusted
        counts = {k: v for k, v in sizes.get(site, {}).items() if k in ("test n", "events")}
        row: dict[str, Any] = {"site": site, **counts}
        for method in methods:
            values = [r[metric] for r in comparison if r["site"] == site and r["method"] == method]
            row[method] = float(values[0]) if values else float("nan")
        table.append(row)
    means: dict[str, Any] = {"site": "**mean over sites**"}
    means.update({m: float(np.nanmean([r[m] for r in table])) for m in methods})
    spread = {m: float(np.nanstd([r[m] for r in table], ddof=1)) if len(table) > 1 else float("nan") for m in methods}
    table.append(means)
    write_json(out / "summary.json", {"dataset": spec.dataset, "partition": spec.partition, "metric": metric,
                                      "rounds": spec.rounds, "strategy": spec.strategy, "fusion": spec.fusion,
                                      "mean_over_sites": {m: means[m] for m in methods},
                                      "scale_sites": spec.scale_sites,
                                      # the cluster the sites ran on ("" = a private local Ray instance)
                                      "ray_address": ray_init_args(spec.ray_address).get("address", ""),
                                      "selected_round": result.selected_round, "selection": result.selection,
                                      "federated_rounds": result.rounds})
    plot_bars({m: means[m] for m in methods}, out / f"methods_{metric}.png",
              ylabel=f"{metric}: site mean ± sd", title=f"{schema_name}: {spec.partition} split",
              errors={m: (means[m] - spread[m], means[m] + spread[m]) for m in methods}, reference=chance_level(metric))
    lines = [
        (f"# fedfusion study: {schema_name}, scale mode, {spec.scale_sites} virtual sites" if spec.scale_sites > 0
         else f"# fedfusion study: {schema_name}, {spec.partition} split, {len(sites)} sites"), "",
        f"Each cell is the test-split {metric} of one site. Federated = the global model of round "
        f"{result.selected_round} of {spec.rounds} of {spec.strategy} ({spec.local_epochs} local epochs, fusion "
        f"`{spec.fusion}`; " + ("chosen by the sites' validation splits" if result.selection != "last"
                                else "the last round") + "); "
        "pooled = one model trained on all sites' training rows (what no hospital may do); local-only = "
        "each site alone. "
        + (f"Scale mode: {spec.scale_sites} VIRTUAL sites of {spec.rows_per_site} real rows each, drawn with "
           "replacement across sites (simulations/scale_sites.py); only the sites sampled for evaluation "
           "appear below (a different sample each round), and there are no baselines." if spec.scale_sites > 0
           else "Partition " + ("`natural`: your sites (--sites-dir)." if spec.sites_dir is not None else
                                "`natural`: real sites of the data set." if spec.partition == "natural" else
                                f"`{spec.partition}`: SIMULATED sites.")), "",
        markdown_table(table, digits=3), "",
        f"Per-round federated metrics: `federated/metrics.csv`, plot `federated/global_{metric}_per_round.png`, "
        f"per-site metrics `federated/site_metrics.csv`, global model `federated/model.pt`.", "",
        *split_lines(out / "data"),
        "## Rounds", "", "Site-weighted means of what the sites reported; every column (timings, counts, σ per "
        "site) is in `federated/metrics.csv`.", "", markdown_table(rounds_table(result.rounds, metric)), "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
