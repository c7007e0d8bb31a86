"""One seed of a study (:mod:`fedfusion.simulations.experiment`): its sites, then every step.

Each step reuses the code a single run uses: ``simulate.prepare_sites`` for the sites,
``local_training.run_local_training`` for pooled / local-only / unimodal baselines,
``simulate.run_simulated_federation`` (Flower's simulation runtime) for federated arms and
``simulate.score_site`` to score a model on a site's test split. What this module adds is the
bookkeeping around them: modality-subset and leave-one-site-out data files written beside the
seed's site manifests (so image paths stay inside the data folder), the rows of ``results.csv``,
the per-round rows, and the test predictions the report's curves are drawn from.

Site-reported metrics are the numbers of record for federated arms (what the federation itself
measured); the runner also rescores the final global model at each site -- with the statistics the
site fits on its own training rows, as ``client.runtime`` does -- only to draw curves and to run
the test-time modality ablation, which sites would not report. Personalised methods (FedPer, FedAvg+FT,
Ditto) are scored with each site's own model, which only the site holds: their per-case predictions are
the ones each simulated site kept in its state folder at the last round (:func:`personal_predictions`).
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from fedfusion.common.config import Schema, load_schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.manifest import Manifest, ManifestError, load_manifest
from fedfusion.common.personalization import Personalization, personal_view
from fedfusion.common.training import (
    LossFunction,
    Predictions,
    make_loader,
    metrics_from,
    pick_device,
    predict,
    primary_metric,
)
from fedfusion.simulations.experiment import Method, Study, StudyProgress, StudyRecord
from fedfusion.simulations.local_training import LocalResult, run_local_training
from fedfusion.simulations.simulate import (
    SimulationSpec,
    baseline_configs,
    prepare_sites,
    run_config_for,
    run_simulated_federation,
    score_site,
)
from fedfusion.simulations.study_statistics import case_counts
from fedfusion.simulations.tuning import TunedChoice, run_tuned, with_choice

log = logging.getLogger("fedfusion.experiment")


class SeedRun:
    """One seed of a study: sites, then every step; results go into the shared :class:`StudyRecord`."""

    def __init__(self, study: Study, seed: int, index: int, seed_dir: Path, record: StudyRecord,
                 on_progress: Callable[[StudyProgress], None] | None, token: str) -> None:
        self.study, self.seed, self.index, self.dir, self.record = study, seed, index, seed_dir, record
        self.on_progress, self.token = on_progress, token
        self.spec = SimulationSpec(dataset=study.dataset, out_dir=seed_dir, partition=study.partition,
                                   sites_dir=Path(study.sites_dir) if study.sites_dir else None,
                                   num_sites=study.num_sites, rounds=study.rounds, fusion=study.fusion,
                                   local_epochs=study.local_epochs, batch_size=study.batch_size, lr=study.lr,
                                   seed=seed, baseline_epochs=study.baseline_epochs, device=study.device,
                                   cpus_per_site=study.cpus_per_site, gpus_per_site=study.gpus_per_site,
                                   partition_options=dict(study.partition_options))
        self.done, self.steps = 0, 1
        self.chosen: dict[str, TunedChoice] = {}  # tuned methods (fedprox-tuned): the value kept in this seed
        self.run_configs: dict[Path, dict[str, Any]] = {}  # run dir -> the run config its ClientApps ran with

    # -- plumbing

    def progress(self, step: str, **extra: Any) -> None:
        if self.on_progress is not None:
            self.on_progress(StudyProgress(seed=self.seed, seed_index=self.index, seeds=len(self.study.seeds),
                                           step=step, done=self.done, steps=self.steps, **extra))

    def step(self, label: str, work: Callable[[], None]) -> None:
        """Run one step; a failure is recorded (or raised with ``fail-fast``) and the study goes on."""
        self.progress(label)
        try:
            work()
        except Exception as err:  # noqa: BLE001 - one failing arm must not lose hours of other arms
            if self.study.fail_fast:
                raise
            log.error("seed %d, %s failed: %s", self.seed, label, err)
            self.record.failures.append({"seed": str(self.seed), "step": label, "error": f"{type(err).__name__}: "
                                         f"{err}", "traceback": traceback.format_exc(limit=6)})
        self.done += 1
        self.progress(label)

    def add(self, method: str, family: str, site: str, metrics: Mapping[str, Any], modalities: tuple[str, ...],
            pred: Predictions | None = None, **extra: Any) -> None:
        row = {"seed": self.seed, "method": method, "family": family, "site": site,
               "modalities": "+".join(modalities), **extra}
        row.update({k: float(v) for k, v in metrics.items() if k not in ("round", "phase", "site")
                    and isinstance(v, int | float) and not isinstance(v, bool)})
        if "num-examples" in row:
            row["n_test"] = row.pop("num-examples")
        elif pred is not None:
            row["n_test"] = float(_length(pred))
        if pred is not None:
            row.update(case_counts(pred))  # events / positives: what a site's metric rests on
        row.setdefault(self.metric, math.nan)
        self.record.rows.append(row)
        if pred is not None:
            self.record.predictions.setdefault(method, []).append((self.seed, site, pred))

    # -- the seed

    def run(self) -> None:
        study, record = self.study, self.record
        self.progress("building sites")
        self.schema_path, self.sites = prepare_sites(self.spec)
        self.schema = load_schema(self.schema_path)
        self.metric = primary_metric(self.schema)
        record.dataset_name, record.metric, record.task = self.schema.name, self.metric, self.schema.task
        record.modalities, record.classes = self.schema.modalities, self.schema.classes
        self.manifests = {s: load_manifest(p, self.schema, check_images=False, allow_single_class=True)
                          for s, p in self.sites.items()}
        self.pooled_path = _write_union(self.schema_path.parent / "pooled-sites.csv", list(self.sites.values()))
        base = self.base_run_config()
        self.model_cfg = FederationConfig.from_run_config(base).model
        _, self.train_cfg = baseline_configs(self.spec)
        multimodal = len(self.schema.modalities) >= 2
        names = [m.name for m in study.methods]
        unimodal = study.unimodal if study.unimodal is not None else (
            tuple(n for n in ("pooled", *[m.name for m in study.federated][:1]) if n in names) if multimodal else ())
        if unimodal and not multimodal and self.index == 1:
            record.notes.append(f"unimodal baselines skipped: '{self.schema.name}' has one modality")
        variants = _variants(self.schema.modalities) if multimodal else []
        work: list[tuple[str, Callable[[], None]]] = []
        if "pooled" in names:
            work.append(("pooled", self.run_pooled))
        if "local-only" in names:
            work.append(("local-only", self.run_local))
        for method in study.federated:
            work.append((method.name, lambda m=method: self.run_federated(m)))
        for keep in variants:
            for name in unimodal:
                work.append((f"{name} [{_variant_label(keep, self.schema.modalities)}]",
                             lambda n=name, k=keep: self.run_variant(study.method(n), k)))
        if study.leave_one_site_out and len(self.sites) >= 2:
            for held_out in self.sites:
                for method in study.methods:
                    if method.kind != "local-only":
                        work.append((f"{method.name} without {held_out}",
                                     lambda m=method, h=held_out: self.run_held_out(m, h)))
        if study.tabular:
            work.append(("tabular baselines", self.run_tabular))
        self.steps = len(work)
        for label, fn in work:
            self.step(label, fn)

    def base_run_config(self) -> dict[str, Any]:
        cfg = run_config_for(self.spec, self.schema_path, self.sites)
        return {**cfg, **self.study.run_config}

    # -- baselines

    def run_pooled(self) -> None:
        pooled = run_local_training(load_manifest(self.pooled_path, self.schema, check_images=False),
                                    self.model_cfg, self.train_cfg)
        for site, manifest in self.manifests.items():
            pred = score_site(pooled.model, pooled.preprocessor, manifest, self.study.device)
            self.add("pooled", "baseline", site, metrics_from(pred), self.schema.modalities, pred)
            self.ablate("pooled", pooled.model, pooled.preprocessor, site, manifest)

    def run_local(self) -> None:
        models: dict[str, LocalResult] = {}
        for site, manifest in self.manifests.items():
            models[site] = run_local_training(manifest, self.model_cfg, self.train_cfg)
            self.progress("local-only", metric=self.metric, value=models[site].test.get(self.metric, math.nan))
        for owner, local in models.items():
            for site, manifest in self.manifests.items():
                pred = score_site(local.model, local.preprocessor, manifest, self.study.device)
                if site == owner:
                    self.add("local-only", "baseline", site, metrics_from(pred), self.schema.modalities, pred)
                # the validation score lets the report choose a *fair* best local-only (not on test)
                val = (metrics_from(score_site(local.model, local.preprocessor, manifest, self.study.device,
                                               split="val")).get(self.metric, math.nan)
                       if len(manifest.rows("val")) else math.nan)
                self.add(f"local model {owner}", "local-cross", site, metrics_from(pred), self.schema.modalities,
                         pred, model_site=owner, **{f"val_{self.metric}": float(val)})

    # -- federated

    def federate(self, method: Method, tag: str, schema_path: Path, sites: dict[str, Path]) -> tuple[Any, Path]:
        """Run one federation in Flower's simulation runtime; return (FederationResult, run dir)."""
        run_dir = self.dir / tag
        cfg = {**run_config_for(self.spec, schema_path, sites), **self.study.run_config, **method.overrides}
        cfg.update({"run-dir": str(run_dir), "seed": self.seed,
                    "min-sites": min(int(cfg.get("min-sites", len(sites))), len(sites))})  # a LOSO run has fewer
        if "study" not in method.overrides and "study" not in self.study.run_config:
            cfg["study"] = f"{self.study.name}/{self.token}/seed-{self.seed}/{tag}"
        rounds = int(cfg["num-server-rounds"])
        label = tag.replace("/", " ")

        def on_round(row: dict[str, Any]) -> None:
            value = row.get(f"eval_{self.metric}", math.nan)
            self.progress(label, round=int(row["round"]), rounds=rounds, metric=self.metric, value=float(value))

        result = run_simulated_federation(cfg, len(sites), cpus_per_site=self.study.cpus_per_site,
                                          gpus_per_site=self.study.gpus_per_site, on_round=on_round)
        self.run_configs[run_dir] = _client_run_config(cfg, len(sites))
        self.note_trouble(label, result)
        return result, run_dir

    def note_trouble(self, label: str, result: Any) -> None:
        """Put what the server logged against a run into the report: a federation whose replies were
        rejected or refused trained fewer rounds than the table suggests."""
        where = f"seed {self.seed}, {label}"
        if result.rejected:
            first = result.rejected[0]
            rounds = sorted({int(r["round"]) for r in result.rejected})
            self.record.notes.append(f"{where}: the server rejected {len(result.rejected)} site replies in rounds "
                                     f"{rounds} (first: {first.get('site')}: {first.get('reason')})")
        if result.refusals:
            self.record.notes.append(f"{where}: {len(result.refusals)} site rounds refused (privacy policy or budget)")
        if result.ended_early:
            self.record.notes.append(f"{where}: {result.ended_early}")
            self.record.ended_early.append({"seed": str(self.seed), "method": label, "why": str(result.ended_early)})

    def run_federated(self, method: Method) -> None:
        extra: dict[str, Any] = {}
        if method.tune_values:  # one run per value; the one best on validation is the method's result
            def one_run(fixed: Method, tag: str) -> tuple[Any, Path]:
                return self.federate(fixed, tag, self.schema_path, self.sites)

            choice, result, run_dir = run_tuned(method, one_run, lambda r: list(_final_metrics(r).values()),
                                                self.metric)
            self.chosen[method.name] = choice
            self.record.notes.append(choice.describe(f"seed {self.seed}, {method.name}", self.metric))
            extra = {f"chosen_{choice.key.replace('-', '_')}": float(choice.value)}
        else:
            result, run_dir = self.federate(method, method.name, self.schema_path, self.sites)
        self.add_rounds(method.name, result)
        personal = Personalization.from_run_config({**self.study.run_config, **method.overrides})
        own_models = personal.reports_personal or bool(personal.private_parts)
        model = None if own_models else _load_model(run_dir / "model.pt")  # personalised: not the scored model
        missing: dict[str, str] = {}
        client_cfg = self.run_configs.get(run_dir)  # None: not run by federate(), so its site files are unknown
        for site, metrics in _final_metrics(result).items():
            if model is None:
                # scored as each site's own model (its fine-tuned copy / Ditto model / private head); model.pt
                # is not that model, so no test-time ablation; the per-case predictions are the ones each
                # site kept of its own model at the last round (client/personalization.py)
                row = personal_view(metrics, self.metric) if personal.reports_personal else metrics
                pred = None
                if client_cfg is not None:
                    pred, why = personal_predictions(client_cfg, site, self.schema, row, self.metric,
                                                     self.manifests.get(site))
                    if pred is None:
                        missing[site] = why
                self.add(method.name, "federated", site, row, self.schema.modalities, pred, **extra)
                continue
            manifest = self.manifests[site]
            pre = Preprocessor.fit(manifest)  # what the site itself standardises with
            pred = score_site(model, pre, manifest, self.study.device)
            self.add(method.name, "federated", site, metrics, self.schema.modalities, pred, **extra)
            self.ablate(method.name, model, pre, site, manifest)
        if missing:
            self.record.notes.append(f"seed {self.seed}, {method.name}: no per-case predictions of the sites' own "
                                     "models from " + "; ".join(f"{s} ({why})" for s, why in missing.items()))

    def add_rounds(self, method: str, result: Any) -> None:
        per_round: dict[int, list[float]] = {}
        for m in result.site_metrics:
            if m["phase"] == "evaluate":
                per_round.setdefault(int(m["round"]), []).append(float(m.get(self.metric, math.nan)))
        for row in result.rounds:
            r = int(row["round"])
            values = per_round.get(r, [])
            out = {"seed": self.seed, "method": method, "round": r,
                   self.metric: float(np.nanmean(values)) if values and not np.all(np.isnan(values)) else math.nan}
            for key in ("train_epsilon", "client_dp_epsilon", "train_loss", "eval_loss", "seconds"):
                if key in row:
                    out[key.removeprefix("train_") if key == "train_epsilon" else key] = float(row[key])
            self.record.rounds.append(out)

    # -- extras

    def ablate(self, method: str, model: torch.nn.Module, pre: Preprocessor, site: str, manifest: Manifest) -> None:
        """Score the fused model with each modality hidden at test time (multimodal data only)."""
        if not self.study.ablation or len(self.schema.modalities) < 2:
            return
        for index, modality in enumerate(self.schema.modalities):
            pred = predict_without(model, pre, manifest, index, self.study.device)
            if pred is None:
                continue
            kept = tuple(m for m in self.schema.modalities if m != modality)
            self.add(f"{method} [{modality} hidden at test]", "ablation-test", site, metrics_from(pred), kept)

    def run_variant(self, method: Method, keep: tuple[str, ...]) -> None:
        """The same method on a subset of modalities (unimodal baseline / trained ablation)."""
        method = with_choice(method, self.chosen.get(method.name))  # a tuned method: its value of this seed
        tag = _variant_tag(keep, self.schema.modalities)
        label = f"{method.name} [{_variant_label(keep, self.schema.modalities)}]"
        schema_path, sites, skipped = write_modality_subset(self.schema, self.schema_path.parent, self.sites, keep,
                                                            tag)
        if skipped and self.index == 1:
            self.record.notes.append(f"{label}: sites left out (no usable rows with {'+'.join(keep)}): "
                                     + "; ".join(f"{s} ({why})" for s, why in skipped.items()))
        if not sites:
            raise ValueError(f"no site has usable rows with modalities {list(keep)}")
        schema = load_schema(schema_path)
        original = {variant: site for site, variant in ((s, f"{s}.{tag}") for s in self.sites)}
        manifests = {v: load_manifest(p, schema, check_images=False, allow_single_class=True) for v, p in sites.items()}
        family = "unimodal" if len(keep) == 1 else "ablation-trained"
        if method.kind == "pooled":
            pooled_path = _write_union(self.schema_path.parent / f"pooled-sites.{tag}.csv", list(sites.values()))
            pooled = run_local_training(load_manifest(pooled_path, schema, check_images=False), self.model_cfg,
                                        self.train_cfg)
            for v, manifest in manifests.items():
                pred = score_site(pooled.model, pooled.preprocessor, manifest, self.study.device)
                self.add(label, family, original[v], metrics_from(pred), keep, pred, base_method=method.name)
        elif method.kind == "local-only":
            for v, manifest in manifests.items():
                local = run_local_training(manifest, self.model_cfg, self.train_cfg)
                pred = score_site(local.model, local.preprocessor, manifest, self.study.device)
                self.add(label, family, original[v], metrics_from(pred), keep, pred, base_method=method.name)
        else:
            result, _ = self.federate(method, f"{method.name}.{tag}", schema_path, sites)
            self.add_rounds(label, result)
            for v, metrics in _final_metrics(result).items():
                self.add(label, family, original[v], metrics, keep, base_method=method.name)

    def run_held_out(self, method: Method, held_out: str) -> None:
        """Train on every site but ``held_out``; score on the held-out site's test split."""
        method = with_choice(method, self.chosen.get(method.name))  # a tuned method: its value of this seed
        others = {s: p for s, p in self.sites.items() if s != held_out}
        manifest = self.manifests[held_out]
        label = f"{method.name} (leave-one-site-out)"
        if method.kind == "pooled":
            path = _write_union(self.schema_path.parent / f"pooled-sites.without-{held_out}.csv", list(others.values()))
            pooled = run_local_training(load_manifest(path, self.schema, check_images=False), self.model_cfg,
                                        self.train_cfg)
            pred = score_site(pooled.model, pooled.preprocessor, manifest, self.study.device)
        else:
            _, run_dir = self.federate(method, f"loso-{held_out}/{method.name}", self.schema_path, others)
            pred = score_site(_load_model(run_dir / "model.pt"), Preprocessor.fit(manifest), manifest,
                              self.study.device)
        self.add(label, "leave-one-site-out", held_out, metrics_from(pred), self.schema.modalities, pred,
                 base_method=method.name)

    def run_tabular(self) -> None:
        from fedfusion.simulations.tabular_baselines import run_site_tabular_baselines

        if not (self.schema.clinical or self.schema.omics):
            if self.index == 1:
                self.record.notes.append("tabular baselines skipped: the data set has no clinical/omics table")
            return
        models = list(self.study.tabular) if isinstance(self.study.tabular, tuple) else None
        rows = run_site_tabular_baselines(self.pooled_path, self.sites, self.schema, self.seed, models=models)
        table = tuple(m for m in self.schema.modalities if m != "image")
        for row in rows:
            self.add(row["method"], "tabular", row["site"], {self.metric: row[self.metric]}, table)


# ----------------------------------------------------------------------------------- helpers


def _length(pred: Predictions) -> int:
    for value in (pred.labels, pred.risk):
        if value is not None:
            return len(value)
    return 0


def _final_metrics(result: Any) -> dict[str, dict[str, Any]]:
    """Each site's metrics of the delivered global model, as the site reported them."""
    from fedfusion.server.report import delivered_evaluations

    return {str(m["site"]): m for m in sorted(delivered_evaluations(result), key=lambda m: str(m["site"]))}


def _client_run_config(run_config: dict[str, Any], num_sites: int) -> dict[str, Any]:
    """The run config the simulated ClientApps ran with: ``run_simulated_federation`` adds the secure-aggregation
    test bed's key (same folder again after the run, so the config hash, which names site files, is the same)."""
    from fedfusion.common.secagg.testbed import with_simulation_keys

    return with_simulation_keys(run_config, num_sites)


def personal_predictions(run_config: Mapping[str, Any], site: str, schema: Schema, row: Mapping[str, Any],
                         metric: str, manifest: Manifest | None = None) -> tuple[Predictions | None, str]:
    """The per-case test predictions a simulated site kept of its own model (private head, fine-tuned copy,
    Ditto model) for the delivered round of ``row`` (its evaluate row as the study records it: ``metric`` is
    the site's own model's), and "" -- or (None, why) when there are none to use.

    Sites keep them for the last round only; predictions are used only when they are the reported model's:
    ``metric`` recomputed from them equals the reported one (sites release 3 decimals in deployment: within
    0.0005; a site that withheld it: none are used), the case count matches, and the cases are
    ``manifest``'s test rows in scoring order (bootstrap resamples pair rows across methods by position).
    """
    from fedfusion.client.personalization import read_predictions, simulated_predictions_path

    server_round = int(row.get("round", -1))
    path = simulated_predictions_path(run_config, site, schema, server_round)
    if not path.is_file():
        return None, f"the site kept none for round {server_round}: sites keep them for the run's last round"
    try:
        found = read_predictions(path)
    except (OSError, ValueError) as err:
        return None, f"unreadable {path.name}: {err}"
    count = _length(found.pred)
    expected = row.get("num-examples", row.get("n_test"))
    if expected is not None and math.isfinite(float(expected)) and int(float(expected)) != count:
        return None, f"{path.name} holds {count} cases, the site reported {int(float(expected))}"
    if manifest is not None:
        ids = manifest.frame["case_id"].to_numpy()[manifest.rows("test")]
        if tuple(str(c) for c in ids) != found.case_ids:
            return None, f"{path.name}: its cases are not the site's test rows in order"
    reported = float(row.get(metric, math.nan))
    computed = metrics_from(found.pred).get(metric, math.nan)
    if not math.isfinite(reported) and math.isfinite(computed):  # e.g. sim-min-eval-cases withheld it
        return None, f"the site released no {metric}; its predictions would show one the table does not"
    if math.isfinite(reported) and not abs(computed - reported) <= 5e-4 + 1e-9:
        return None, f"{metric} from {path.name} is {computed:.6f}, the site reported {reported:.6f}"
    return found.pred, ""


def _load_model(path: Path) -> torch.nn.Module:
    from fedfusion.simulations.explain import load_global_model

    return load_global_model(path).model


def _write_union(path: Path, manifests: list[Path]) -> Path:
    """One CSV holding the rows of these site manifests as the sites hold them (blanked modalities
    stay blank), beside them so image paths stay valid: the pooled baseline's training data."""
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in manifests]
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return path


def _variants(modalities: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Single modalities, plus every all-but-one set when there are three or more."""
    singles = [(m,) for m in modalities]
    if len(modalities) < 3:
        return singles
    return singles + [tuple(x for x in modalities if x != m) for m in modalities]


def _variant_tag(keep: tuple[str, ...], modalities: tuple[str, ...]) -> str:
    if len(keep) == 1:
        return f"only-{keep[0]}"
    return "without-" + "-".join(m for m in modalities if m not in keep)


def _variant_label(keep: tuple[str, ...], modalities: tuple[str, ...]) -> str:
    if len(keep) == 1:
        return f"{keep[0]} only"
    return "without " + "+".join(m for m in modalities if m not in keep)


def write_modality_subset(schema: Schema, data_dir: Path, sites: dict[str, Path], keep: tuple[str, ...],
                          tag: str) -> tuple[Path, dict[str, Path], dict[str, str]]:
    """Schema and site manifests restricted to ``keep``, written beside the originals (image paths
    stay inside the folder) as ``site-<site>.<tag>.csv``: rows lacking every kept modality are
    dropped; a site left without train or test rows (or with one class) is left out.

    Returns (restricted schema path, {"<site>.<tag>": manifest}, {site: why it was left out}); the
    federation sees the subset sites under their ``<site>.<tag>`` names.
    """
    restricted = schema.with_modalities(keep)
    schema_path = restricted.save(data_dir / f"schema.{tag}.json")
    out: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for site, path in sites.items():
        present = load_manifest(path, schema, check_images=False, allow_single_class=True).modality_present()
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
        kept = raw[present[list(keep)].any(axis=1).to_numpy()]
        target = data_dir / f"site-{site}.{tag}.csv"
        kept.to_csv(target, index=False)
        try:
            manifest = load_manifest(target, restricted, check_images=False)
        except ManifestError as err:
            lines = str(err).splitlines()  # "N problem(s) in ...:" then one "  - path: what" per problem
            skipped[site] = lines[1].strip().removeprefix("- ") if len(lines) > 1 else lines[0]
            continue
        if len(manifest.rows("test")) == 0:
            skipped[site] = "no test rows"
            continue
        out[f"{site}.{tag}"] = target
    return schema_path, out, skipped


class _Hidden(Dataset):
    """A test dataset with one modality hidden (mask False), restricted to rows that keep another."""

    def __init__(self, data: MultimodalDataset, index: int) -> None:
        present = data.manifest.modality_present().iloc[data.rows].to_numpy(dtype=bool)
        self.data, self.index = data, index
        self.rows = np.flatnonzero(np.delete(present, index, axis=1).any(axis=1)).tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.data[self.rows[i]])
        mask = item["mask"].clone()
        mask[self.index] = False
        item["mask"] = mask
        return item


def predict_without(model: torch.nn.Module, pre: Preprocessor, manifest: Manifest, index: int,
                    device: str = "cpu", split: str = "test") -> Predictions | None:
    """Predictions with modality ``index`` hidden (the model's learned "absent" path), on the rows
    that still have another modality; None when no such row exists."""
    hidden = _Hidden(MultimodalDataset(manifest, pre, split), index)
    if len(hidden) == 0:
        return None
    return predict(model, make_loader(hidden, 256, shuffle=False), LossFunction(manifest.schema), pick_device(device))
