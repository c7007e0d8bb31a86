"""Tree and linear baselines on a site's clinical (+ omics) table: what a site gets without deep learning.

They cannot be averaged by FedAvg, so they show two things in a report: what a hospital reaches
alone with a random forest or a Cox model, and whether federating the deep model beats that.

Same preprocessing as the neural model (FLamby's rule): the table is built from the very tensors
:class:`fedfusion.common.data.MultimodalDataset` gives the network, with a
:class:`fedfusion.common.data.Preprocessor` fitted on the train split only. Numeric clinical values
are z-scored with a missing flag each, categorical columns are one-hot (the network's embedding
index, with "missing" as its own level), omics are z-scored with 0 where missing, and a
modality-present flag per tabular modality mirrors the network's modality mask. Columns constant on
the training rows are dropped (they carry nothing and make the Cox fit singular). Images are never
used. Wide omics (e.g. 7,106 genes) are cut to the ``max_omics`` features with the largest training
standard deviation, read from the fitted preprocessor (unsupervised, train split only), because a
Cox model on thousands of columns with a few hundred patients does not converge in useful time.

Models: classification -> ``random_forest``, ``gradient_boosting`` (HistGradientBoosting),
``logistic_regression``; survival -> ``cox_ph`` (lifelines ``CoxPHFitter`` with an L2 ``cox_penalizer``,
default 1.0: with ~160 features and a few hundred events weak penalties overfit -- ovarian pooled test
C-index 0.56/0.64/0.60 at 0.01 vs 0.61/0.69/0.67 at 1.0 for split seeds 0/1/2; pass another value or
choose it on the val split for a study) and ``random_survival_forest`` (scikit-survival, an
optional GPL extra: reported under ``skipped`` when absent). Metrics come from
:mod:`fedfusion.common.metrics` (AUC, C-index, ...) on the test split, like every other model here.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from fedfusion.common.config import Schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.manifest import Manifest, load_manifest
from fedfusion.common.metrics import classification_report, survival_report
from fedfusion.common.training import primary_metric
from fedfusion.simulations.local_training import assign_split

CLASSIFIERS = ("random_forest", "gradient_boosting", "logistic_regression")
SURVIVAL_MODELS = ("cox_ph", "random_survival_forest")


@dataclass(frozen=True)
class Table:
    """One split as a plain feature matrix plus its targets (``labels`` are class indices or -1)."""

    x: np.ndarray
    columns: tuple[str, ...]
    labels: np.ndarray
    time: np.ndarray | None
    event: np.ndarray | None

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class TableBuilder:
    """Turns any manifest of the federation into :class:`Table` s with statistics fitted once.

    Fitted on one manifest's train split; applying it to another manifest (a site's test rows
    scored by the pooled model) uses the fitted statistics, never the other manifest's.
    """

    schema: Schema
    preprocessor: Preprocessor
    omics_keep: np.ndarray
    keep: np.ndarray

    @classmethod
    def fit(cls, manifest: Manifest, max_omics: int | None = 256) -> TableBuilder:
        pre = Preprocessor.fit(manifest)
        n_omics = len(manifest.schema.omics)
        omics_keep = np.arange(n_omics)
        if max_omics is not None and n_omics > max_omics:
            omics_keep = np.sort(np.argsort(-pre.omics_std, kind="stable")[:max_omics])
        draft = cls(manifest.schema, pre, omics_keep, np.ones(0, dtype=bool))
        x, _, _ = draft._matrix(manifest, "train")
        keep = (np.nanmax(x, axis=0) > np.nanmin(x, axis=0)) if len(x) else np.zeros(x.shape[1], dtype=bool)
        return cls(manifest.schema, pre, omics_keep, keep)

    def table(self, manifest: Manifest, split: str | None) -> Table:
        x, columns, batch = self._matrix(manifest, split)
        has_survival = self.schema.has_survival
        return Table(
            x=x[:, self.keep],
            columns=tuple(c for c, k in zip(columns, self.keep, strict=True) if k),
            labels=batch["label"].numpy(),
            time=batch["time"].numpy().astype(float) if has_survival else None,
            event=batch["event"].numpy().astype(int) if has_survival else None,
        )

    def _tensors(self, manifest: Manifest, split: str | None) -> dict[str, torch.Tensor]:
        """The network's own input tensors for these rows (the adapter: the dataset yields tensors)."""
        dataset = MultimodalDataset(manifest, self.preprocessor, split, cache_images=False)
        if len(dataset) == 0:
            raise ValueError(f"{manifest.path}: no rows in the {split!r} split")
        return torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])

    def _matrix(self, manifest: Manifest, split: str | None) -> tuple[np.ndarray, list[str], dict[str, torch.Tensor]]:
        schema, batch = self.schema, self._tensors(manifest, split)
        n = len(batch["mask"])
        blocks: list[np.ndarray] = []
        columns: list[str] = []
        if schema.clinical:
            blocks.append(batch["clinical_num"].numpy().reshape(n, -1))
            for col in schema.numeric_columns:
                columns += [col.name, f"{col.name}_missing"]
            codes = batch["clinical_cat"].numpy().reshape(n, -1)
            for j, col in enumerate(schema.categorical_columns):
                levels = ("missing", *col.categories)
                blocks.append((codes[:, j : j + 1] == np.arange(len(levels))).astype(float))
                columns += [f"{col.name}={level}" for level in levels]
        if schema.omics:
            blocks.append(batch["omics"].numpy().reshape(n, -1)[:, self.omics_keep])
            columns += [schema.omics[i] for i in self.omics_keep]
        blocks.append(batch["mask"].numpy().reshape(n, -1).astype(float))
        columns += [f"{m}_present" for m in schema.modalities]
        return np.concatenate(blocks, axis=1).astype(np.float64), columns, batch


def load_tabular_manifest(manifest_path: str | Path, schema: Schema, seed: int, use_omics: bool = True) -> Manifest:
    """Validate a manifest against the schema restricted to its table (no image is opened).

    A manifest without a ``split`` column gets the same seeded split ``train-local`` would draw.
    Single-class training rows are accepted here and reported per model instead.
    """
    keep = tuple(m for m in schema.modalities if m == "clinical" or (m == "omics" and use_omics))
    if not keep:
        raise ValueError(
            f"schema '{schema.name}' has no clinical table{'' if use_omics else ' (omics excluded)'}; "
            "tabular baselines need clinical or omics columns"
        )
    manifest = load_manifest(manifest_path, schema.with_modalities(keep), check_images=False, allow_single_class=True)
    if not manifest.has_split_column:
        assign_split(manifest, seed)
    return manifest


def fit_tabular_models(
    train: Table,
    schema: Schema,
    seed: int,
    models: Sequence[str] | None = None,
    *,
    cox_penalizer: float = 1.0,
    n_jobs: int = 1,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Fit the requested models on ``train``; return ({name: fitted model}, {name: why skipped})."""
    wanted = list(models) if models is not None else _default_models(schema)
    unknown = sorted(set(wanted) - set(CLASSIFIERS) - set(SURVIVAL_MODELS))
    if unknown:
        raise ValueError(f"unknown tabular model(s) {unknown}; choose from {list(CLASSIFIERS + SURVIVAL_MODELS)}")
    fitted: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in wanted:
        if name in CLASSIFIERS and not schema.has_classification:
            skipped[name] = f"the {schema.task} task has no class label"
        elif name in SURVIVAL_MODELS and not schema.has_survival:
            skipped[name] = f"the {schema.task} task has no time/event"
        elif name in CLASSIFIERS and len(np.unique(train.labels)) < 2:
            skipped[name] = "the training rows hold a single class"
        elif name in SURVIVAL_MODELS and train.event is not None and not train.event.any():
            skipped[name] = "no event among the training rows"
        else:
            try:  # OpenMP/BLAS pools capped at n_jobs: oversubscribed cores slow HistGradientBoosting 10x
                with threadpool_limits(limits=n_jobs):
                    fitted[name] = _fit_one(name, train, seed, cox_penalizer, n_jobs)
            except ImportError:
                skipped[name] = 'scikit-survival is not installed (optional extra: pip install "fedfusion[datasets]")'
    return fitted, skipped


def score_tabular_models(fitted: dict[str, Any], test: Table, schema: Schema) -> dict[str, dict[str, float]]:
    """Test metrics per fitted model, from :mod:`fedfusion.common.metrics`."""
    out: dict[str, dict[str, float]] = {}
    for name, model in fitted.items():
        if name in CLASSIFIERS:
            probs = np.zeros((len(test), schema.num_classes))
            probs[:, model.classes_] = model.predict_proba(test.x)
            report = classification_report(test.labels, probs[:, 1] if schema.num_classes == 2 else probs)
        else:
            report = survival_report(test.time, test.event, _risk(name, model, test))
        out[name] = {k: float(v) for k, v in report.items()}
    return out


def run_tabular_baselines(
    manifest_path: str | Path,
    schema: Schema,
    seed: int = 0,
    *,
    models: Sequence[str] | None = None,
    use_omics: bool = True,
    max_omics: int | None = 256,
    cox_penalizer: float = 1.0,
    n_jobs: int = 1,
) -> dict[str, Any]:
    """Fit every tabular baseline on the manifest's train split and score it on its test split.

    Returns ``{"primary_metric", "n_train", "n_test", "n_features", "models": {name: metrics},
    "skipped": {name: reason}, "seconds": {name: fit + score time}}``; ``models`` holds e.g.
    ``{"random_forest": {"auc": 0.99, "balanced_accuracy": ..., ...}}`` or ``{"cox_ph": {"c_index": ...}}``.
    """
    manifest = load_tabular_manifest(manifest_path, schema, seed, use_omics)
    if len(manifest.rows("test")) == 0:
        raise ValueError(f"{manifest_path}: no rows in the 'test' split; nothing to score the baselines on")
    builder = TableBuilder.fit(manifest, max_omics)
    train, test = builder.table(manifest, "train"), builder.table(manifest, "test")
    result: dict[str, Any] = {
        "primary_metric": primary_metric(schema),
        "n_train": len(train),
        "n_test": len(test),
        "n_features": train.x.shape[1],
        "models": {},
        "skipped": {},
        "seconds": {},
    }
    for name in list(models) if models is not None else _default_models(schema):
        start = time.perf_counter()
        fitted, skipped = fit_tabular_models(train, schema, seed, [name], cox_penalizer=cox_penalizer, n_jobs=n_jobs)
        result["skipped"].update(skipped)
        result["models"].update(score_tabular_models(fitted, test, schema))
        if fitted:
            result["seconds"][name] = round(time.perf_counter() - start, 3)
    return result


def run_site_tabular_baselines(
    pooled_manifest: str | Path, sites: dict[str, Path], schema: Schema, seed: int = 0, **kwargs: Any
) -> list[dict[str, Any]]:
    """Pooled and local-only tabular baselines, each scored on every site's own test split.

    Rows match :func:`fedfusion.simulations.simulate.run_baselines`: ``{"site", "method", <metric>}``
    with methods ``pooled <model>`` and ``local-only <model>``, ready for the study report.
    """
    use_omics, max_omics = kwargs.pop("use_omics", True), kwargs.pop("max_omics", 256)
    metric = primary_metric(schema)
    pooled = load_tabular_manifest(pooled_manifest, schema, seed, use_omics)
    pooled_builder = TableBuilder.fit(pooled, max_omics)
    pooled_models, _ = fit_tabular_models(pooled_builder.table(pooled, "train"), schema, seed, **kwargs)
    rows: list[dict[str, Any]] = []
    for site, path in sites.items():
        local = load_tabular_manifest(path, schema, seed, use_omics)
        scores = score_tabular_models(pooled_models, pooled_builder.table(local, "test"), schema)
        rows += [
            {"site": site, "method": f"pooled {m}", metric: v.get(metric, float("nan"))} for m, v in scores.items()
        ]
        builder = TableBuilder.fit(local, max_omics)
        models, _ = fit_tabular_models(builder.table(local, "train"), schema, seed, **kwargs)
        scores = score_tabular_models(models, builder.table(local, "test"), schema)
        rows += [
            {"site": site, "method": f"local-only {m}", metric: v.get(metric, float("nan"))} for m, v in scores.items()
        ]
    return rows


def _default_models(schema: Schema) -> list[str]:
    return (list(CLASSIFIERS) if schema.has_classification else []) + (
        list(SURVIVAL_MODELS) if schema.has_survival else []
    )


def _fit_one(name: str, train: Table, seed: int, cox_penalizer: float, n_jobs: int) -> Any:
    if name == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        model = RandomForestClassifier(
            n_estimators=300, min_samples_leaf=2, class_weight="balanced", random_state=seed, n_jobs=n_jobs
        )
        return model.fit(train.x, train.labels)
    if name == "gradient_boosting":
        from sklearn.ensemble import HistGradientBoostingClassifier

        model = HistGradientBoostingClassifier(class_weight="balanced", random_state=seed)
        return model.fit(train.x, train.labels)
    if name == "logistic_regression":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced").fit(train.x, train.labels)
    if name == "cox_ph":
        from lifelines import CoxPHFitter

        frame = pd.DataFrame(train.x, columns=[f"x{i}" for i in range(train.x.shape[1])])
        frame["_time"], frame["_event"] = train.time, train.event
        with warnings.catch_warnings():  # lifelines warns on near-collinear columns; the penalty handles them
            warnings.simplefilter("ignore")
            return CoxPHFitter(penalizer=cox_penalizer).fit(frame, duration_col="_time", event_col="_event")
    from sksurv.ensemble import RandomSurvivalForest
    from sksurv.util import Surv

    model = RandomSurvivalForest(
        n_estimators=200, min_samples_leaf=10, max_features="sqrt", random_state=seed, n_jobs=n_jobs
    )
    return model.fit(train.x, Surv.from_arrays(event=train.event.astype(bool), time=train.time))


def _risk(name: str, model: Any, test: Table) -> np.ndarray:
    """Higher = earlier event, the convention of :func:`fedfusion.common.metrics.concordance_index`."""
    if name == "cox_ph":
        frame = pd.DataFrame(test.x, columns=[f"x{i}" for i in range(test.x.shape[1])])
        return np.asarray(model.predict_log_partial_hazard(frame), dtype=float).ravel()
    return np.asarray(model.predict(test.x), dtype=float)
