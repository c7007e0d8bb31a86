"""Split a pooled manifest into site manifests written beside it (image paths stay inside its folder).

Partitions (``how``):

- ``natural``: the data's real site column (a study, cohort or institution). Not simulated.
- ``iid``: rows dealt out at random, stratified by split and label/event.
- ``dirichlet``: label skew. For each target class the share going to each site is drawn from
  Dirichlet(``alpha``): small alpha (0.1-0.3) gives sites dominated by one class, large alpha
  (>= 100) is close to IID. The target is the label for classification; for survival it is the
  event indicator (``skew_on="event"``, default: sites differ in how many events they saw, which is
  what the Cox loss and the C-index feed on) or a follow-up-time quantile bin (``skew_on="time"``,
  ``time_bins`` bins over all rows: sites differ in their patients' prognosis).
- ``quantity``: site sizes differ, label mix does not. Sizes are ``min_site_rows`` plus a share of
  the rest drawn from Dirichlet(``alpha``) (``size_law="dirichlet"``) or proportional to
  ``rank ** -power`` (``size_law="power"``, site1 largest); rows are dealt so that every site holds
  its exact size with (split, target) strata as proportional as integers allow.
- ``covariate-shift``: sites differ in the distribution of one clinical/omics feature
  (``shift_feature``): rows are ranked by ``strictness * z(feature) + (1 - strictness) * noise`` and
  cut into equal parts (site1 lowest). Missing feature values are replaced by random draws from the
  observed ones, so those cases land anywhere.
- ``modality-missing``: IID sites, then the modality overlay below with ``missing_sites=1`` by default.

Modality overlay (any ``how``): with ``missing_modality`` set, ``missing_sites`` whole sites lose that
modality (every split: a hospital without the scanner has no test images either) and a
``missing_fraction`` of the rows at every other site lose it. "Lose" means the value is blanked in
the written site manifest (empty image/omics path, empty omics or clinical cells), which
:mod:`fedfusion.common.manifest` reads as missing, so the dataset's modality mask sees it exactly as
it would see a real gap. A case is never left with no modality at all.

Every split keeps a per-site test set: the pooled manifest's ``split`` column is kept (shipped data
sets draw it stratified per site), or, without one or with ``resplit=True``, each site gets its own
stratified train/val/test split. Every site must be usable: at least ``min_site_rows`` rows, train and
test rows, two classes (classification) or an event (survival) among its training rows -- unless
``allow_single_class=True``, which drops the last two requirements. The guard truncates strong
label skew (redrawn splits are the less skewed ones): on WDBC with 4 sites, 10 seeds, the mean label
TV distance is 0.31 / 0.29 / 0.26 / 0.02 at alpha 0.1 / 0.3 / 1 / 100 with the guard (alpha 0.1 finds
no usable split for 4 of 10 seeds) and 0.39 / 0.34 / 0.26 / 0.02 without it; skew studies that want
the untruncated Dirichlet pass ``allow_single_class=True``. Random
partitions retry with derived seeds (``max_attempts``) and otherwise raise :class:`PartitionError`
naming the sites and what they lack. ``partition.json`` beside the site manifests records the seed,
the attempt and seed actually used, every parameter, the source manifest's SHA-256 and per-site
counts, so a split can be rebuilt and audited.

``flwr-datasets`` reuse: its ``DirichletPartitioner`` (label skew) and ``ContinuousPartitioner``
(covariate shift) run on a Hugging Face ``Dataset`` built from the one column they read (cheap, and
they only return row indices, which we map back onto the pandas frame). Its ``IidPartitioner`` and
``SizePartitioner`` are not used: they cut contiguous, unstratified chunks, so a small site could
end up with a single class or no test rows; our stratified dealing keeps label and split mix
constant, which is the point of an IID or quantity-only split. Natural splits need nothing from it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedfusion.client.runtime import site_manifest_path
from fedfusion.common.config import Schema
from fedfusion.common.longitudinal import case_rows
from fedfusion.simulations.datasets import DatasetError, assign_splits

PARTITIONS = ("natural", "iid", "dirichlet", "quantity", "covariate-shift", "modality-missing")
PARTITION_FILE = "partition.json"
SIZE_LAWS = ("dirichlet", "power")
_BLANKS = ("", "na", "nan", "null", "none")


class PartitionError(ValueError):
    """A split cannot be made as asked; the message names the sites and the option to change."""


def partition_manifest(
    manifest_path: Path,
    schema: Schema,
    how: str,
    num_sites: int = 3,
    seed: int = 0,
    *,
    alpha: float | None = None,
    skew_on: str | None = None,
    time_bins: int = 4,
    size_law: str = "dirichlet",
    power: float = 1.5,
    shift_feature: str | None = None,
    shift_strictness: float = 0.8,
    missing_modality: str | None = None,
    missing_sites: int | None = None,
    missing_fraction: float = 0.0,
    min_site_rows: int = 10,
    allow_single_class: bool = False,
    resplit: bool = False,
    max_attempts: int = 20,
) -> dict[str, Path]:
    """Write ``site-<name>.csv`` files and ``partition.json`` next to ``manifest_path``.

    Returns {site name: manifest path}. ``alpha`` defaults to 0.5 for ``dirichlet`` and 1.0 for
    ``quantity`` sizes; see the module docstring for every option. Values are copied byte for byte
    from the pooled manifest except blanked modalities and (when drawn here) the ``split`` column.
    """
    manifest_path = Path(manifest_path)
    raw = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    visit_rows = None
    if schema.visits is not None:  # long format: sites and splits are drawn per case, each case keeps all its rows
        if missing_modality is not None or how == "modality-missing":
            raise PartitionError(f"schema '{schema.name}' has a long-format (visits) manifest; the missing-modality "
                                 "overlay is not available for it yet")
        long_raw, (raw, visit_rows) = raw, case_rows(raw)
    options = {
        "alpha": alpha,
        "skew_on": skew_on,
        "time_bins": time_bins,
        "size_law": size_law,
        "power": power,
        "shift_feature": shift_feature,
        "shift_strictness": shift_strictness,
        "missing_modality": missing_modality,
        "missing_sites": missing_sites,
        "missing_fraction": missing_fraction,
        "min_site_rows": min_site_rows,
        "allow_single_class": allow_single_class,
    }
    params = _check_options(raw, schema, how, num_sites, options)
    has_split = "split" in raw.columns and not resplit
    attempts = 1 if how == "natural" else max(1, max_attempts)
    failures: list[str] = []
    site_failures: list[str] = []  # the most telling reason: a named site and what it lacks
    for attempt in range(attempts):
        attempt_seed = seed if attempt == 0 else int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])
        try:
            assignment = _assign(raw, schema, how, num_sites, attempt_seed, params)
            split = (
                raw["split"].str.strip().str.lower()
                if has_split
                else _draw_splits(raw, schema, assignment, attempt_seed)
            )
        except (PartitionError, DatasetError) as err:
            failures = [str(err)]
            continue
        failures = site_failures = _site_problems(raw, schema, assignment, split, min_site_rows, allow_single_class)
        if not failures:
            break
    else:
        hint = (
            "the natural sites are what they are: lower min_site_rows or choose another partition"
            if how == "natural"
            else f"no usable split in {attempts} attempts; raise --alpha, lower --num-sites, "
            "lower --shift-strictness or min_site_rows"
        )
        raise PartitionError(
            f"{manifest_path}: partition {how!r} failed ({hint}):\n"
            + "\n".join(f"  - {f}" for f in site_failures or failures)
        )
    if visit_rows is not None:  # back to one row per visit, each carrying its case's site and split
        raw, assignment, split = long_raw, assignment[visit_rows], pd.Series(np.asarray(split)[visit_rows])
    out = raw.copy()
    if not has_split:
        if "split" not in out.columns:
            out.insert(2 if "site" in out.columns else 1, "split", "")
        out["split"] = split.to_numpy()
    params["split"] = "kept from the pooled manifest" if has_split else "drawn per site (stratified 70/10/20)"
    if how in ("dirichlet", "covariate-shift"):
        from importlib.metadata import version

        params["flwr_datasets"] = version("flwr-datasets")
    sites = sorted(pd.unique(assignment), key=_site_key)
    rng = np.random.default_rng(np.random.SeedSequence([attempt_seed, 1]))
    blanked = _blank_modality(out, schema, assignment, sites, params, rng) if params.get("missing_modality") else {}
    return _write(manifest_path, out, schema, assignment, sites, blanked, how, seed, attempt, attempt_seed, params)


# --------------------------------------------------------------------------- options


def _check_options(
    raw: pd.DataFrame, schema: Schema, how: str, num_sites: int, options: dict[str, Any]
) -> dict[str, Any]:
    """Validate once, before any drawing, and return only the parameters this split uses."""
    alpha, skew_on, time_bins = options["alpha"], options["skew_on"], options["time_bins"]
    size_law, power, min_site_rows = options["size_law"], options["power"], options["min_site_rows"]
    shift_feature, shift_strictness = options["shift_feature"], options["shift_strictness"]
    missing_modality = options["missing_modality"]
    if how not in PARTITIONS:
        raise PartitionError(f"unknown partition {how!r}; choose one of {list(PARTITIONS)}")
    if how != "natural" and num_sites < 1:
        raise PartitionError(f"num_sites must be >= 1, got {num_sites}")
    if min_site_rows < 3:
        raise PartitionError(f"min_site_rows must be >= 3 (one train, val and test row), got {min_site_rows}")
    params: dict[str, Any] = {"min_site_rows": min_site_rows, "allow_single_class": bool(options["allow_single_class"])}
    if how != "natural":
        params["num_sites"] = num_sites
    if how == "natural" and (not schema.site_column or schema.site_column not in raw.columns):
        raise PartitionError(
            f"data set '{schema.name}' has no natural site column; use --partition iid, "
            "dirichlet, quantity or covariate-shift"
        )
    if how in ("dirichlet", "quantity"):
        params["alpha"] = float(alpha if alpha is not None else (0.5 if how == "dirichlet" else 1.0))
        if params["alpha"] <= 0:
            raise PartitionError(f"alpha must be > 0, got {params['alpha']}")
    if how == "dirichlet":
        target = skew_on or ("label" if schema.has_classification else "event")
        allowed = ["label"] if schema.has_classification else []
        allowed += ["event", "time"] if schema.has_survival else []
        if target not in allowed:
            raise PartitionError(f"skew_on={target!r} does not fit a {schema.task} task; choose one of {allowed}")
        params["skew_on"] = target
        if target == "time":
            if time_bins < 2:
                raise PartitionError(f"time_bins must be >= 2, got {time_bins}")
            params["time_bins"] = time_bins
    if how == "quantity":
        if size_law not in SIZE_LAWS:
            raise PartitionError(f"size_law must be one of {list(SIZE_LAWS)}, got {size_law!r}")
        params["size_law"] = size_law
        if size_law == "power":
            params["power"] = float(power)
            del params["alpha"]
    if how == "covariate-shift":
        features = [c.name for c in schema.clinical] + ([] if "omics" in raw.columns else list(schema.omics))
        if shift_feature not in features:
            raise PartitionError(
                f"covariate-shift needs --shift-feature, one of the clinical/omics columns "
                f"{features[:12]}{' ...' if len(features) > 12 else ''}; got {shift_feature!r}"
            )
        if not 0.0 <= shift_strictness <= 1.0:
            raise PartitionError(f"shift_strictness must be in [0, 1], got {shift_strictness}")
        params.update(shift_feature=shift_feature, shift_strictness=float(shift_strictness))
    if how == "modality-missing" or missing_modality is not None:
        params.update(
            _missing_options(
                schema, how, num_sites, missing_modality, options["missing_sites"], options["missing_fraction"]
            )
        )
    return params


def _missing_options(
    schema: Schema, how: str, num_sites: int, modality: str | None, sites: int | None, fraction: float
) -> dict[str, Any]:
    if len(schema.modalities) < 2:
        raise PartitionError(
            f"schema '{schema.name}' has only the {schema.modalities[0]} modality; removing it "
            "would leave cases with nothing, so modality-missing skew needs a multimodal data set"
        )
    if modality is None:
        modality = "image" if schema.image is not None else "omics" if schema.omics else None
    if modality not in schema.modalities:
        raise PartitionError(
            f"missing_modality={modality!r}: schema '{schema.name}' has modalities {list(schema.modalities)}"
        )
    sites = (1 if how == "modality-missing" else 0) if sites is None else sites
    if how != "natural" and not 0 <= sites < num_sites:
        raise PartitionError(
            f"missing_sites must be in [0, {num_sites - 1}] so that some site keeps the "
            f"{modality} modality; got {sites}"
        )
    if not 0.0 <= fraction < 1.0:
        raise PartitionError(f"missing_fraction must be in [0, 1), got {fraction}")
    return {"missing_modality": modality, "missing_sites": int(sites), "missing_fraction": float(fraction)}


# --------------------------------------------------------------------------- site assignment


def _assign(
    raw: pd.DataFrame, schema: Schema, how: str, num_sites: int, seed: int, params: dict[str, Any]
) -> np.ndarray:
    """Site name per row (``site1``..``siteN`` for simulated splits)."""
    if how == "natural":
        return raw[schema.site_column].str.strip().to_numpy(dtype=object)
    if how in ("iid", "modality-missing"):
        return _iid_assignment(raw, schema, num_sites, seed)
    if how == "dirichlet":
        return _dirichlet_assignment(raw, schema, num_sites, seed, params)
    if how == "quantity":
        return _quantity_assignment(raw, schema, num_sites, seed, params)
    return _shift_assignment(raw, schema, num_sites, seed, params)


def _target(raw: pd.DataFrame, schema: Schema) -> pd.Series:
    """What IID/quantity splits stratify by: the label, or the event indicator for survival."""
    return raw[schema.label_column if schema.has_classification else schema.event_column].str.strip()


def _strata(raw: pd.DataFrame, schema: Schema) -> pd.Series:
    split = raw["split"].str.strip() if "split" in raw.columns else pd.Series("train", index=raw.index)
    return split + "|" + _target(raw, schema)


def _iid_assignment(raw: pd.DataFrame, schema: Schema, num_sites: int, seed: int) -> np.ndarray:
    """Round-robin over a shuffled order within each (split, label/event) stratum."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(raw), dtype=object)
    for _, idx in raw.groupby(_strata(raw, schema)).indices.items():
        order = rng.permutation(idx)
        offset = int(rng.integers(num_sites))
        for k, row in enumerate(order):
            out[row] = f"site{(k + offset) % num_sites + 1}"
    return out


def _dirichlet_assignment(
    raw: pd.DataFrame, schema: Schema, num_sites: int, seed: int, params: dict[str, Any]
) -> np.ndarray:
    partitioner_cls = _flwr_partitioner("DirichletPartitioner")
    target = _skew_target(raw, schema, params)
    # the partitioner cuts each class in file order: shuffle first so file order cannot leak into sites
    order = np.random.default_rng(seed).permutation(len(raw))
    partitioner = partitioner_cls(
        num_partitions=num_sites,
        partition_by="target",
        alpha=params["alpha"],
        min_partition_size=params["min_site_rows"],
        self_balancing=False,
        seed=seed,
    )
    return _run_flwr(partitioner, {"target": target.to_numpy()[order].tolist()}, order, num_sites)


def _skew_target(raw: pd.DataFrame, schema: Schema, params: dict[str, Any]) -> pd.Series:
    """The class each row is skewed by: label, event, or follow-up-time quantile bin (ties broken by order)."""
    skew_on = params.get("skew_on") or ("label" if schema.has_classification else "event")
    if skew_on == "time":
        time = pd.to_numeric(raw[schema.time_column], errors="coerce")
        return pd.qcut(time.rank(method="first"), params["time_bins"], labels=False).astype(str)
    return raw[schema.label_column if skew_on == "label" else schema.event_column].str.strip()


def _shift_assignment(
    raw: pd.DataFrame, schema: Schema, num_sites: int, seed: int, params: dict[str, Any]
) -> np.ndarray:
    partitioner_cls = _flwr_partitioner("ContinuousPartitioner")
    values = _feature_values(raw, schema, params["shift_feature"])
    rng = np.random.default_rng(seed)
    missing = np.isnan(values)
    if missing.all():
        raise PartitionError(f"shift feature {params['shift_feature']!r} is missing for every case")
    values[missing] = rng.choice(values[~missing], size=int(missing.sum()))
    order = rng.permutation(len(raw))
    partitioner = partitioner_cls(
        num_partitions=num_sites, partition_by="value", strictness=params["shift_strictness"], shuffle=False, seed=seed
    )
    return _run_flwr(partitioner, {"value": values[order].tolist()}, order, num_sites)


def _feature_values(raw: pd.DataFrame, schema: Schema, feature: str) -> np.ndarray:
    """Numbers for ranking: numeric values, or a categorical column's index in the schema's order."""
    column = next((c for c in schema.clinical if c.name == feature), None)
    text = raw[feature].str.strip()
    if column is not None and column.kind == "categorical":
        lookup = {c: float(i) for i, c in enumerate(column.categories)}
        return text.map(lambda v: lookup.get(v, np.nan)).to_numpy(dtype=float)
    return pd.to_numeric(text.where(~text.str.lower().isin(_BLANKS)), errors="coerce").to_numpy(dtype=float)


def _flwr_partitioner(name: str) -> Any:
    try:
        import flwr_datasets.partitioner as partitioners
    except ImportError:
        raise PartitionError(
            f"this partition uses flwr-datasets' {name}; install it with pip install 'flwr-datasets>=0.6'"
        ) from None
    return getattr(partitioners, name)


def _run_flwr(partitioner: Any, columns: dict[str, list[Any]], order: np.ndarray, num_sites: int) -> np.ndarray:
    """Give the partitioner a small HF Dataset (the column it reads + a row id) and map rows back."""
    from datasets import Dataset

    partitioner.dataset = Dataset.from_dict({**columns, "row": order.tolist()})
    out = np.empty(len(order), dtype=object)
    try:
        with warnings.catch_warnings():  # it warns on each internal redraw; our retry loop reports instead
            warnings.simplefilter("ignore")
            for pid in range(num_sites):
                out[np.asarray(partitioner.load_partition(pid)["row"], dtype=int)] = f"site{pid + 1}"
    except ValueError as err:
        raise PartitionError(
            f"no draw gave every site >= min_site_rows rows (flwr-datasets {type(partitioner).__name__}: {err})"
        ) from None
    return out


def _quantity_assignment(
    raw: pd.DataFrame, schema: Schema, num_sites: int, seed: int, params: dict[str, Any]
) -> np.ndarray:
    n, floor = len(raw), params["min_site_rows"]
    if num_sites * floor > n:
        raise PartitionError(
            f"{num_sites} sites x min_site_rows {floor} = {num_sites * floor} rows, but the "
            f"data set has {n}; lower --num-sites or min_site_rows"
        )
    rng = np.random.default_rng(seed)
    if params["size_law"] == "power":
        share = np.arange(1, num_sites + 1, dtype=float) ** -params["power"]
    else:
        share = rng.dirichlet(np.full(num_sites, params["alpha"]))
    sizes = floor + _apportion(n - num_sites * floor, share / share.sum())
    # systematic dealing: each site's slots are evenly spaced over the stratum-sorted rows, so every
    # site gets its exact size and a near-proportional share of every (split, target) stratum
    slots = np.concatenate([(np.arange(s) + rng.uniform()) * n / s for s in sizes])
    owner = np.repeat(np.arange(num_sites), sizes)[np.argsort(slots, kind="stable")]
    rows = np.lexsort((rng.permutation(n), pd.Categorical(_strata(raw, schema)).codes))
    out = np.empty(n, dtype=object)
    out[rows] = [f"site{k + 1}" for k in owner]
    return out


def _apportion(total: int, share: np.ndarray) -> np.ndarray:
    """Integers proportional to ``share`` summing exactly to ``total`` (largest remainder)."""
    quota = total * share
    out = np.floor(quota).astype(int)
    out[np.argsort(-(quota - out), kind="stable")[: total - out.sum()]] += 1
    return out


# --------------------------------------------------------------------------- splits and checks


def _draw_splits(raw: pd.DataFrame, schema: Schema, assignment: np.ndarray, seed: int) -> pd.Series:
    """Per-site stratified 70/10/20 train/val/test, as the shipped data set builders draw it."""
    return assign_splits(pd.Series(assignment, index=raw.index), _target(raw, schema), seed)


def _site_problems(
    raw: pd.DataFrame, schema: Schema, assignment: np.ndarray, split: pd.Series, min_rows: int, single_class: bool
) -> list[str]:
    """Why a site could not train or be scored; empty when every site is usable."""
    problems: list[str] = []
    split = pd.Series(np.asarray(split), index=raw.index)
    for site in sorted(pd.unique(assignment), key=_site_key):
        rows = assignment == site
        train = rows & (split == "train").to_numpy()
        n_test = int((rows & (split == "test").to_numpy()).sum())
        if rows.sum() < min_rows:
            problems.append(f"site {site!r} has {int(rows.sum())} rows; each site needs >= {min_rows}")
        if not train.any() or n_test == 0:
            problems.append(f"site {site!r} has {int(train.sum())} train and {n_test} test rows; needs both")
        if single_class:
            continue
        if schema.has_classification and train.any():
            labels = raw.loc[train, schema.label_column].str.strip().unique()
            if len(labels) < 2:
                problems.append(f"site {site!r}: every training case has label {labels[0]!r}; needs two classes")
        if schema.has_survival and train.any():
            events = pd.to_numeric(raw.loc[train, schema.event_column], errors="coerce")
            if not (events == 1).any():
                problems.append(f"site {site!r}: no event among its training cases; the Cox loss needs events")
    return problems


def _site_key(site: object) -> tuple[int, str]:
    """``site2`` before ``site10``; other names alphabetically."""
    text = str(site)
    return (int(text[4:]), "") if text.startswith("site") and text[4:].isdigit() else (10**9, text)


# --------------------------------------------------------------------------- modality overlay


def _modality_columns(frame: pd.DataFrame, schema: Schema, modality: str) -> list[str]:
    if modality == "image":
        return [schema.image.column] if schema.image is not None and schema.image.column in frame.columns else []
    if modality == "omics":
        return ["omics"] if "omics" in frame.columns else list(schema.omics)
    if modality == "visits":
        return [schema.visits.time_column] if schema.visits is not None else []
    return [c.name for c in schema.clinical]


def _present(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    if not columns:
        return np.zeros(len(frame), dtype=bool)
    return (~frame[columns].apply(lambda c: c.str.strip().str.lower().isin(_BLANKS))).any(axis=1).to_numpy()


def _blank_modality(
    frame: pd.DataFrame,
    schema: Schema,
    assignment: np.ndarray,
    sites: list[str],
    params: dict[str, Any],
    rng: np.random.Generator,
) -> dict[str, int]:
    """Blank one modality in place for whole sites and a fraction of rows elsewhere; count per site."""
    modality = params["missing_modality"]
    columns = _modality_columns(frame, schema, modality)
    others = [m for m in schema.modalities if m != modality]
    if params["missing_sites"] >= len(sites):
        raise PartitionError(
            f"missing_sites={params['missing_sites']} but there are only {len(sites)} sites; "
            f"at least one must keep the {modality} modality"
        )
    keeps_another = np.column_stack([_present(frame, _modality_columns(frame, schema, m)) for m in others]).any(axis=1)
    whole = set(rng.choice(np.asarray(sites, dtype=object), size=params["missing_sites"], replace=False).tolist())
    counts: dict[str, int] = {}
    for site in sites:
        rows = np.flatnonzero(assignment == site)
        if site not in whole:
            rows = rng.choice(rows, size=int(round(params["missing_fraction"] * len(rows))), replace=False)
        rows = rows[keeps_another[rows]]  # never leave a case with nothing to learn from
        if columns:
            frame.loc[frame.index[rows], columns] = ""
        counts[site] = int(len(rows))
    params["sites_without_modality"] = sorted(whole, key=_site_key)
    return counts


# --------------------------------------------------------------------------- writing


def _write(
    manifest_path: Path,
    frame: pd.DataFrame,
    schema: Schema,
    assignment: np.ndarray,
    sites: list[str],
    blanked: dict[str, int],
    how: str,
    seed: int,
    attempt: int,
    attempt_seed: int,
    params: dict[str, Any],
) -> dict[str, Path]:
    folder = manifest_path.parent
    _remove_stale(folder, set(sites))
    paths: dict[str, Path] = {}
    summary: dict[str, Any] = {}
    modalities = {m: _modality_columns(frame, schema, m) for m in schema.modalities}
    for site in sites:
        part = frame[assignment == site]
        path = site_manifest_path(folder, str(site))
        part.to_csv(path, index=False)
        paths[str(site)] = path
        visit_rows = len(part)
        if schema.visits is not None:  # long format: count cases, not visit rows
            part = part.drop_duplicates(subset="case_id")
        info: dict[str, Any] = {
            "manifest": path.name,
            "rows": len(part),
            "splits": {s: int((part["split"] == s).sum()) for s in ("train", "val", "test")},
        }
        if schema.has_classification:
            counts = part[schema.label_column].str.strip().value_counts()
            info["labels"] = {c: int(counts.get(c, 0)) for c in schema.classes}
        if schema.has_survival:
            info["events"] = int((pd.to_numeric(part[schema.event_column], errors="coerce") == 1).sum())
        info["modality_present"] = {m: int(_present(part, cols).sum()) for m, cols in modalities.items()}
        if schema.visits is not None:
            info["visit_rows"] = visit_rows
        if blanked:
            info["modality_blanked"] = blanked[site]
        if "shift_feature" in params:
            info["shift_feature_mean"] = float(np.nanmean(_feature_values(part, schema, params["shift_feature"])))
        summary[str(site)] = info
    record = {
        "partition": how,
        "seed": seed,
        "attempt": attempt,
        "attempt_seed": attempt_seed,
        "simulated": how != "natural",
        "parameters": params,
        "source": {
            "manifest": manifest_path.name,
            "rows": len(frame),
            "sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
        },
        "label_skew_tv": _label_skew(frame, schema, assignment, params),
        "sites": summary,
    }
    (folder / PARTITION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return paths


def _label_skew(frame: pd.DataFrame, schema: Schema, assignment: np.ndarray, params: dict[str, Any]) -> float:
    """Mean over sites of the total-variation distance between a site's target mix and the pooled one
    (0 = every site looks like the pool, 1 = sites share no class)."""
    target = _skew_target(frame, schema, params)
    pooled = target.value_counts(normalize=True)
    distances = [
        0.5
        * (target[assignment == s].value_counts(normalize=True).reindex(pooled.index, fill_value=0) - pooled)
        .abs()
        .sum()
        for s in pd.unique(assignment)
    ]
    return float(np.mean(distances))


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete site manifests an earlier partition of this folder wrote (only those it recorded)."""
    record = folder / PARTITION_FILE
    if not record.is_file():
        return
    try:
        old = json.loads(record.read_text()).get("sites", {})
    except (json.JSONDecodeError, AttributeError):
        return
    for site, info in old.items():
        name = info.get("manifest", "") if isinstance(info, dict) else ""
        if site not in keep and name.startswith("site-") and name.endswith(".csv") and "/" not in name:
            (folder / name).unlink(missing_ok=True)
