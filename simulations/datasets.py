"""Build federation-ready data sets from real data shipped inside installed packages (offline).

Every builder writes the same layout (DESIGN.md §3) into one folder, so pooled, local-only and
federated runs share one loading path::

    out_dir/schema.json     the federation schema (:class:`fedfusion.common.config.Schema`)
    out_dir/manifest.csv    pooled manifest, one row per patient
    out_dir/images/*.png    only for image data sets; the manifest's ``image`` column is relative

Manifest columns: ``case_id``; ``site`` (only when the data has a real site, e.g. ``study-16``;
then ``schema.site_column == "site"``); ``split`` (train/val/test); ``label`` (classification) or
``time`` (> 0) and ``event`` (0/1) (survival); ``image``; the schema's clinical columns (numbers, or
category strings; empty = missing); the schema's omics columns.

Splits are drawn here with ``seed``: within each site, stratified by label (classification) or
event (survival), 20 % of the site goes to test, 10 % of the rest to val, the remainder to train;
every site gets at least one row in each split. Counts per stratum are apportioned by largest
remainder, so the per-site totals are exact and the strata are as close to proportional as integers
allow.

SurvSet (GPL) is an optional extra: data sets that need it raise :class:`DatasetError` asking for
``pip install "fedfusion[datasets]"``. Nothing is downloaded, nothing is vendored.

Per-data-set decisions (also in each :class:`DatasetInfo` description):

- ``ovarian``: times are days to recurrence; two patients with time 0 get 0.5 days (time must be
  > 0). ``fac_debulk`` 0/1 is mapped to ``optimal``/``suboptimal``: the source does not label the
  codes, and code 1 has the higher recurrence hazard (Cox HR 1.32, p = 0.001), as suboptimal
  debulking does in every ovarian cohort.
- ``breast-cohorts``: the cohorts use different end points (gse1992 relapse-free survival, gse3143
  and gse4335 overall survival; months) and different expression scales (gse3143 is on a log2
  intensity scale, mean ~ 7.9; the others are centred); both are kept as real between-site
  heterogeneity: sites standardise on their own train split. gse3143's ER level 0 is ER-negative,
  levels 1-3 ER-positive; gse4335's nodal stage N1/N2 is node-positive and Nx is missing.
- ``lung``: only institutions with at least :data:`LUNG_MIN_SITE_SIZE` patients are kept (9 of 18,
  176 of 228 patients); ``ph.ecog`` is numeric (an ordinal 0-3 score, one patient has 3).
- ``wdbc-multimodal``: no real site (partition it with Dirichlet / label skew and call that
  simulated); images are RENDERED from the "mean" morphometry (see :mod:`.rendering`).
- ``heartvalve`` and ``csl`` (longitudinal, long-format manifest, see
  :mod:`fedfusion.common.longitudinal`): LANDMARK design. A model that saw every visit up to the
  event would learn survival from how many visits there are and how long they span (follow-up length
  leaks the outcome). So a landmark time L is fixed (heartvalve 2 years, csl 1 year: the earliest
  time at which most patients have had >= 2 visits and most events are still to come), only patients
  still at risk at L are kept, they get only their visits at times <= L, and the target is survival
  AFTER L (time - L, event). The source is SurvSet's counting-process table (pid, time, time2,
  event; one row per measurement at ``time``); a patient's follow-up is the last ``time2`` and the
  event sits on the last row.

Plug-ins (docs/plugins.md) add data sets without editing this file: a module named by a
``fedfusion.datasets`` entry point calls :func:`register_dataset` with a :class:`DatasetInfo` and a
builder (the builder contract is in :func:`register_dataset`). Listing and building load those
plug-ins once per process (:mod:`fedfusion.common.plugins`), so ``datasets list/build/export`` and
``simulate --dataset`` accept their names.
"""

from __future__ import annotations

import importlib
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedfusion.common import plugins
from fedfusion.common.config import ClinicalColumn, ImageSpec, Schema, VisitSpec
from fedfusion.common.longitudinal import to_long_format
from fedfusion.common.progress import StepCallback, report
from fedfusion.common.site_split import split_rows
from fedfusion.simulations.rendering import Morphometry, nucleus_rng, render_nucleus, save_png

RESERVED_COLUMNS = ("case_id", "site", "split", "label", "time", "event", "image", "omics")
SPLITS = ("train", "val", "test")
LUNG_MIN_SITE_SIZE = 10
INSTALL_HINT = 'pip install "fedfusion[datasets]"'


class DatasetError(RuntimeError):
    """A data set cannot be built (unknown name, missing optional package, data that breaks a rule)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is and what it needs. ``natural_site`` names the source column that holds a
    real site (study, cohort, institution), or is ``None`` when any partition would be simulated."""

    name: str
    description: str
    task: str
    source: str
    licence: str
    natural_site: str | None
    needs_extra: bool
    time_unit: str | None = None

    @property
    def site_column(self) -> str | None:
        """The manifest column holding the real site (``"site"``), as in ``Schema.site_column``."""
        return "site" if self.natural_site else None


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="ovarian",
            description=(
                "912 ovarian cancer patients from 4 real studies (curatedOvarianData via joint.Cox "
                "dataOvarian1): 158 gene expression features (omics), debulking (optimal/suboptimal, "
                "decoded from the hazard direction), time to recurrence in days. Sites: study-16 (510), "
                "study-13 (260), study-4 (84), study-9 (58)."
            ),
            task="survival",
            source="SurvSet (dataOvarian1)",
            licence="SurvSet is GPL-3.0 (optional extra); data from the joint.Cox R package (GPL-2)",
            natural_site="fac_group",
            needs_extra=True,
            time_unit="days",
        ),
        DatasetInfo(
            name="breast-cohorts",
            description=(
                "397 breast cancer patients from 3 institutions' microarray cohorts (gse1992: 124, "
                "gse3143: 158, gse4335: 115; survJamda.data) on their 7,106 shared genes, with "
                "harmonised ER status, node status, grade and age (missing where a cohort lacks them). "
                "End points differ (gse1992 relapse-free, others overall survival), in months; "
                "expression scales differ by cohort (real batch effects)."
            ),
            task="survival",
            source="SurvSet (gse1992, gse3143, gse4335)",
            licence="SurvSet is GPL-3.0 (optional extra); data from survJamda.data (GPL)",
            natural_site="cohort",
            needs_extra=True,
            time_unit="months",
        ),
        DatasetInfo(
            name="wdbc-multimodal",
            description=(
                "569 Wisconsin diagnostic breast cancer patients (212 malignant, 357 benign). Image: a "
                "64x64 grey nucleus RENDERED from the patient's own 10 'mean' morphometry features "
                "(not a photograph); clinical: the 20 'error' and 'worst' features. No real site: "
                "any partition is simulated."
            ),
            task="classification",
            source="scikit-learn (load_breast_cancer)",
            licence="scikit-learn BSD-3; WDBC from the UCI repository (CC BY 4.0)",
            natural_site=None,
            needs_extra=False,
        ),
        DatasetInfo(
            name="lung",
            description=(
                "NCCTG advanced lung cancer: 176 patients from the 9 institutions with >= 10 patients "
                "(of 228 / 18), survival in days, age, sex, ECOG, Karnofsky (physician and patient), "
                "calories per meal, weight loss; missing values kept as missing."
            ),
            task="survival",
            source="lifelines (load_lung)",
            licence="lifelines MIT; data from the R survival package (LGPL)",
            natural_site="inst",
            needs_extra=False,
            time_unit="days",
        ),
        DatasetInfo(
            name="heartvalve",
            description=(
                "Aortic valve replacement (joineR heart.valve): the 237 of 256 patients still event-free at "
                "the 2-year landmark, their repeated echocardiography up to it (valve gradient, LV mass index, "
                "ejection fraction; 2.3 visits per patient on average) as the 'visits' modality, baseline "
                "covariates as clinical, survival AFTER the landmark in years (48 deaths). Long-format "
                "manifest. No real site: any partition is simulated."
            ),
            task="survival",
            source="SurvSet (heartvalve)",
            licence="SurvSet is GPL-3.0 (optional extra); data from the joineR R package (GPL-3)",
            natural_site=None,
            needs_extra=True,
            time_unit="years",
        ),
        DatasetInfo(
            name="csl",
            description=(
                "CSL1 liver cirrhosis trial (prednisone vs placebo, timereg csl): the 332 of 446 patients alive "
                "at the 1-year landmark, their repeated prothrombin index up to it (3.3 visits on average) as "
                "the 'visits' modality, treatment, sex, centred age and baseline prothrombin as clinical, "
                "survival AFTER the landmark in years (183 deaths). Long-format manifest. No real site."
            ),
            task="survival",
            source="SurvSet (csl)",
            licence="SurvSet is GPL-3.0 (optional extra); data from the timereg R package (GPL)",
            natural_site=None,
            needs_extra=True,
            time_unit="years",
        ),
    )
}


def list_datasets() -> list[DatasetInfo]:
    """Every registered data set (shipped ones first, then plug-ins'), in registration order."""
    plugins.load_plugins(plugins.DATASETS_GROUP)
    return list(DATASETS.values())


def dataset_names() -> list[str]:
    """Names of every registered data set (plug-ins included), in registration order."""
    return [info.name for info in list_datasets()]


# --------------------------------------------------------------------------- splits


def assign_splits(sites: pd.Series, strata: pd.Series, seed: int) -> pd.Series:
    """``train``/``val``/``test`` per row: within each site 20 % test, 10 % of the rest val,
    stratified by ``strata``; raises :class:`DatasetError` for a site with fewer than 3 rows."""
    rng = np.random.default_rng(seed)
    out = pd.Series("train", index=sites.index, dtype=object)
    for site in sorted(sites.unique(), key=str):
        rows = sites.index[sites == site]
        n = len(rows)
        if n < 3:
            raise DatasetError(f"site '{site}' has {n} rows; each site needs >= 3 to fill train/val/test")
        split_rows(rows, strata, rng, out)  # common/site_split.py: the one split algorithm
    return out


# --------------------------------------------------------------------------- loaders


def _require(module: str, dataset: str) -> object:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DatasetError(
            f"data set '{dataset}' needs the optional package '{module}' (GPL-licensed, not installed "
            f"by default); install it with: {INSTALL_HINT}"
        ) from None


def _survset(name: str, dataset: str) -> pd.DataFrame:
    survset_data = _require("SurvSet.data", dataset)
    with warnings.catch_warnings():  # SurvSet unpickles through numpy.core (renamed in NumPy 2): not the user's concern
        warnings.filterwarnings("ignore", message=r"numpy\.core\.numeric is deprecated", category=DeprecationWarning)
        return survset_data.SurvLoader().load_dataset(name)["df"]  # type: ignore[attr-defined]


def _categorical(values: pd.Series, mapping: dict[object, str]) -> pd.Series:
    """Map source codes (compared as strings) to category names; anything unmapped is missing."""
    lookup = {str(k): v for k, v in mapping.items()}
    return values.map(lambda v: lookup.get(str(v), np.nan)).astype(object)


@dataclass
class BuiltDataset:
    """What a data set builder returns; :func:`build_dataset` adds the split and writes the files.

    ``frame``: one row per patient, no ``split`` column (splits are drawn here, seeded), a ``site``
    column only when the data has real sites (then ``schema.site_column == "site"``); ``images``:
    ``images(out_dir, seed)`` writes the files the frame's ``image`` column names (relative to
    ``out_dir``); ``visits``: long-format data sets' per-visit rows (``case_id``, the visit time,
    ``schema.visits.columns``).
    """

    frame: pd.DataFrame  # manifest without split (and with 'site' only if real)
    schema: Schema
    images: Callable[[Path, int], None] | None = None  # writes images into out_dir given seed
    visits: pd.DataFrame | None = None  # long-format data sets: case_id, visit time, per-visit columns


_Built = BuiltDataset  # the shipped builders' short name


def _ovarian() -> _Built:
    df = _survset("dataOvarian1", "ovarian").reset_index(drop=True)
    genes = [c for c in df.columns if c.startswith("num_")]
    frame = pd.DataFrame(
        {
            "case_id": [f"ovarian-{i + 1:04d}" for i in range(len(df))],
            "site": "study-" + df["fac_group"].astype(int).astype(str),
            "time": df["time"].astype(float).clip(lower=0.5),
            "event": df["event"].astype(int),
            "debulking": _categorical(df["fac_debulk"], {0: "optimal", 1: "suboptimal"}),
        }
    )
    omics = pd.DataFrame(df[genes].to_numpy(dtype=float), columns=[g.removeprefix("num_") for g in genes])
    frame = pd.concat([frame, omics], axis=1)
    schema = Schema(
        name="ovarian",
        task="survival",
        clinical=(ClinicalColumn("debulking", "categorical", ("optimal", "suboptimal")),),
        omics=tuple(omics.columns),
        site_column="site",
        description=DATASETS["ovarian"].description,
    )
    return _Built(frame, schema)


_BREAST_COHORTS = ("gse1992", "gse3143", "gse4335")
_POS_NEG = ("negative", "positive")
_GRADES = ("G1", "G2", "G3")


def _breast_clinical(cohort: str, df: pd.DataFrame) -> pd.DataFrame:
    """ER status, node status, grade and age in one encoding; NaN where the cohort lacks them."""
    missing = pd.Series(np.nan, index=df.index, dtype=object)
    grade_map = {1: "G1", 2: "G2", 3: "G3"}
    if cohort == "gse1992":
        er = _categorical(df["fac_er_positive"], {0: "negative", 1: "positive"})
        node = _categorical(df["fac_node_status"], {0: "negative", 1: "positive"})
        grade, age = _categorical(df["fac_grade"], grade_map), df["num_age"].astype(float)
    elif cohort == "gse3143":  # ER level 0-3 (0 = negative); no node status, grade or age
        er = _categorical(df["fac_erlev"], {0: "negative", 1: "positive", 2: "positive", 3: "positive"})
        node, grade, age = missing, missing, pd.Series(np.nan, index=df.index)
    else:  # gse4335: nodal stage N0/N1/N2 ('x' = not assessable, 'na' = missing)
        er = _categorical(df["fac_er_status"], {0: "negative", 1: "positive"})
        node = _categorical(df["fac_node_status"], {0: "negative", 1: "positive", 2: "positive"})
        grade, age = _categorical(df["fac_grade"], grade_map), df["num_age"].astype(float)
    return pd.DataFrame({"er_status": er, "node_status": node, "grade": grade, "age": age})


def _breast_cohorts() -> _Built:
    raw = {c: _survset(c, "breast-cohorts").reset_index(drop=True) for c in _BREAST_COHORTS}
    gene_sets = [{c for c in df.columns if c.startswith("num_HS_")} for df in raw.values()]
    shared = sorted(set.intersection(*gene_sets))
    names = [g.removeprefix("num_HS_") for g in shared]
    if len(set(names)) != len(names):
        raise DatasetError("breast-cohorts: gene names collide after removing the 'num_HS_' prefix")
    parts = []
    for cohort, df in raw.items():
        head = pd.DataFrame(
            {
                "case_id": [f"{cohort}-{i + 1:04d}" for i in range(len(df))],
                "site": cohort,
                "time": df["time"].astype(float),
                "event": df["event"].astype(int),
            }
        )
        genes = pd.DataFrame(df[shared].to_numpy(dtype=float), columns=names)
        parts.append(pd.concat([head, _breast_clinical(cohort, df), genes], axis=1))
    frame = pd.concat(parts, ignore_index=True)
    schema = Schema(
        name="breast-cohorts",
        task="survival",
        clinical=(
            ClinicalColumn("er_status", "categorical", _POS_NEG),
            # gse3143 recorded none of these three: declared, so its site check warns instead of refusing
            ClinicalColumn("node_status", "categorical", _POS_NEG, may_be_absent=True),
            ClinicalColumn("grade", "categorical", _GRADES, may_be_absent=True),
            ClinicalColumn("age", "numeric", may_be_absent=True),
        ),
        omics=tuple(names),
        site_column="site",
        description=DATASETS["breast-cohorts"].description,
    )
    return _Built(frame, schema)


def _snake(feature: str) -> str:
    """scikit-learn WDBC names to snake case: 'worst concave points' -> 'concave_points_worst'."""
    if feature.startswith("worst "):
        return feature.removeprefix("worst ").replace(" ", "_") + "_worst"
    if feature.endswith(" error"):
        return feature.removesuffix(" error").replace(" ", "_") + "_se"
    return feature.replace(" ", "_")


def _wdbc() -> _Built:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    features = data.data.reset_index(drop=True)
    mean_cols = [c for c in features.columns if c.startswith("mean ")]
    clinical_cols = [c for c in features.columns if c not in mean_cols]
    # scikit-learn codes 0 = malignant, 1 = benign
    labels = np.where(data.target.to_numpy() == 0, "malignant", "benign")
    case_ids = [f"wdbc-{i + 1:04d}" for i in range(len(features))]
    frame = pd.DataFrame({"case_id": case_ids, "label": labels, "image": [f"images/{c}.png" for c in case_ids]})
    clinical = features[clinical_cols].rename(columns=_snake).astype(float)
    frame = pd.concat([frame, clinical], axis=1)
    morph = [Morphometry.from_mapping(row) for row in features[mean_cols].to_dict("records")]

    def write_images(out_dir: Path, seed: int) -> None:
        image_dir = out_dir / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        wanted = {f"{c}.png" for c in case_ids}
        for stale in image_dir.glob("*.png"):
            if stale.name not in wanted:
                stale.unlink()
        for i, (case_id, m) in enumerate(zip(case_ids, morph, strict=True)):
            save_png(render_nucleus(m, nucleus_rng(i, seed)), image_dir / f"{case_id}.png")

    schema = Schema(
        name="wdbc-multimodal",
        task="classification",
        classes=("benign", "malignant"),
        clinical=tuple(ClinicalColumn(c, "numeric") for c in clinical.columns),
        image=ImageSpec(column="image", size=(64, 64), channels=1),
        site_column=None,
        description=DATASETS["wdbc-multimodal"].description,
    )
    return _Built(frame, schema, write_images)


_LUNG_NUMERIC = ("age", "ph_ecog", "ph_karno", "pat_karno", "meal_cal", "wt_loss")


def _lung() -> _Built:
    try:
        from lifelines.datasets import load_lung
    except ImportError:  # a site install (`fedfusion[site]`) has no lifelines
        raise DatasetError("data set 'lung' ships inside lifelines (MIT), which is not installed; install it with: "
                           'pip install "fedfusion[simulation]"') from None

    df = load_lung().dropna(subset=["inst"]).reset_index(drop=True)
    df.columns = [c.replace(".", "_") for c in df.columns]
    counts = df["inst"].value_counts()
    df = df[df["inst"].isin(counts.index[counts >= LUNG_MIN_SITE_SIZE])].reset_index(drop=True)
    if set(df["status"].unique()) - {0, 1}:
        raise DatasetError(f"lung: expected status coded 0/1 (1 = dead), got {sorted(df['status'].unique())}")
    frame = pd.DataFrame(
        {
            "case_id": [f"lung-{i + 1:04d}" for i in range(len(df))],
            "site": "inst-" + df["inst"].astype(int).astype(str),
            "time": df["time"].astype(float),
            "event": df["status"].astype(int),  # lifelines recodes R's 1/2 to 0 = censored, 1 = dead
            "sex": _categorical(df["sex"], {1: "male", 2: "female"}),
        }
    )
    for col in _LUNG_NUMERIC:
        frame[col] = df[col].astype(float)
    schema = Schema(
        name="lung",
        task="survival",
        clinical=(ClinicalColumn("sex", "categorical", ("male", "female")),)
        + tuple(ClinicalColumn(c, "numeric") for c in _LUNG_NUMERIC),
        site_column="site",
        description=DATASETS["lung"].description,
    )
    return _Built(frame, schema)


HEARTVALVE_LANDMARK = 2.0  # years
CSL_LANDMARK = 1.0  # years
MAX_VISITS = 8


def _landmark(df: pd.DataFrame, dataset: str, landmark: float, visit_columns: dict[str, str]
              ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Landmark a SurvSet counting-process table (module docstring): (cases at risk at ``landmark``
    with case_id, time after the landmark and event; each case's first source row, for its baseline
    covariates; visits at times <= landmark with case_id, visit_time and ``visit_columns`` renamed)."""
    df = df.sort_values(["pid", "time"], kind="stable").reset_index(drop=True)
    by_pid = df.groupby("pid", sort=True)
    follow, event = by_pid["time2"].max(), by_pid["event"].max()
    last_event = by_pid["event"].last()
    if not (event == last_event).all() or set(event.unique()) - {0, 1}:
        raise DatasetError(f"{dataset}: expected a 0/1 event only on each patient's last row")
    at_risk = follow.index[follow > landmark]
    ids = {pid: f"{dataset}-{int(pid):04d}" for pid in at_risk}
    cases = pd.DataFrame({"case_id": [ids[p] for p in at_risk],
                          "time": (follow.loc[at_risk] - landmark).to_numpy(dtype=float),
                          "event": event.loc[at_risk].to_numpy(dtype=int)})
    baseline = by_pid.first().loc[at_risk].reset_index()
    seen = df[df["pid"].isin(at_risk) & (df["time"] <= landmark)]
    visits = pd.DataFrame({"case_id": seen["pid"].map(ids).to_numpy(), "visit_time": seen["time"].to_numpy(float)})
    for target, source in visit_columns.items():
        visits[target] = seen[source].to_numpy(dtype=float)
    return cases, baseline, visits


def _heartvalve() -> _Built:
    df = _survset("heartvalve", "heartvalve")
    cases, base, visits = _landmark(df, "heartvalve", HEARTVALVE_LANDMARK,
                                    {"grad": "num_grad", "lvmi": "num_lvmi", "ef": "num_ef"})
    no_yes = {0: "no", 1: "yes"}
    clinical = pd.DataFrame({
        "age": base["num_age"].astype(float),
        "sex": _categorical(base["fac_sex"], {0: "male", 1: "female"}),  # joineR: 0 = male, 1 = female
        "bsa": base["num_bsa"].astype(float),
        "creatinine": base["num_creat"].astype(float),
        "valve_size": base["num_size"].astype(float),
        "valve_type": _categorical(base["fac_hs"], {"Homograft": "homograft", "Stentless valve": "stentless"}),
        "lv_function": base["fac_lv"].astype(float),  # pre-operative LV function, ordinal 1 (good) - 3 (poor)
        "redo": _categorical(base["fac_redo"], no_yes),
        "cabg": _categorical(base["fac_con_cabg"], no_yes),
        "diabetes": _categorical(base["fac_dm"], no_yes),
        "ace_inhibitor": _categorical(base["fac_acei"], no_yes),
    })
    cats = {"sex": ("male", "female"), "valve_type": ("homograft", "stentless")}
    columns = tuple(
        ClinicalColumn(c, "categorical", cats.get(c, ("no", "yes"))) if clinical[c].dtype == object
        else ClinicalColumn(c, "numeric") for c in clinical.columns)
    schema = Schema(
        name="heartvalve", task="survival", clinical=columns,
        visits=VisitSpec(time_column="visit_time", columns=("grad", "lvmi", "ef"), max_visits=MAX_VISITS),
        site_column=None, description=DATASETS["heartvalve"].description,
    )
    return _Built(pd.concat([cases, clinical], axis=1), schema, visits=visits)


def _csl() -> _Built:
    df = _survset("csl", "csl")
    cases, base, visits = _landmark(df, "csl", CSL_LANDMARK, {"prothrombin": "num_prot"})
    # SurvSet does not document the 0/1 codes of sex and treatment: kept as numeric 0/1 indicators
    clinical = pd.DataFrame({"treatment": base["fac_treat"].astype(float), "sex": base["fac_sex"].astype(float),
                             "age_centred": base["num_age"].astype(float),
                             "prothrombin_baseline": base["num_prot_base"].astype(float)})
    schema = Schema(
        name="csl", task="survival", clinical=tuple(ClinicalColumn(c, "numeric") for c in clinical.columns),
        visits=VisitSpec(time_column="visit_time", columns=("prothrombin",), max_visits=MAX_VISITS),
        site_column=None, description=DATASETS["csl"].description,
    )
    return _Built(pd.concat([cases, clinical], axis=1), schema, visits=visits)


_BUILDERS: dict[str, Callable[[], _Built]] = {
    "ovarian": _ovarian,
    "breast-cohorts": _breast_cohorts,
    "wdbc-multimodal": _wdbc,
    "lung": _lung,
    "heartvalve": _heartvalve,
    "csl": _csl,
}


plugins.track("data set", lambda: DATASETS)  # after the shipped names: plug-ins' additions are reported


def register_dataset(info: DatasetInfo, builder: Callable[[], BuiltDataset]) -> None:
    """Add data set ``info.name`` (a plug-in's entry point module calls this when imported).

    The builder takes no arguments, reads data that is already on the machine (nothing may be
    downloaded) and returns a :class:`BuiltDataset` whose ``schema.name`` is ``info.name`` and whose
    ``schema.task`` is ``info.task``; ``info.natural_site`` is set exactly when the frame has a
    ``site`` column. It is called on every build, so it should be quick and deterministic (the split
    and rendered detail take the build's seed). The frame must meet the rules every shipped data set
    meets (unique ``case_id``, time > 0, categories within the schema's, no reserved column names):
    they are checked before anything is written.

    The same name twice is refused, as in the model registry (two packages fighting over a name would
    make runs irreproducible); registering the same info and builder again is a no-op.
    """
    if not isinstance(info, DatasetInfo) or not info.name or not isinstance(info.name, str):
        raise ValueError(f"register_dataset needs a DatasetInfo with a non-empty name, got {info!r}")
    if not callable(builder):
        raise ValueError(f"data set '{info.name}': the builder must be callable, got {builder!r}")
    if info.name in DATASETS:
        if DATASETS[info.name] == info and _BUILDERS.get(info.name) is builder:
            return
        owner = getattr(_BUILDERS.get(info.name), "__module__", "?")
        raise ValueError(f"data set '{info.name}' is already registered (by {owner})")
    DATASETS[info.name] = info
    _BUILDERS[info.name] = builder


def _builder(name: str) -> Callable[[], BuiltDataset]:
    """The builder of ``name`` (plug-ins loaded), or a one-line :class:`DatasetError` listing the names."""
    plugins.load_plugins(plugins.DATASETS_GROUP)
    if name not in _BUILDERS:
        raise DatasetError(f"unknown data set '{name}'; available: {', '.join(DATASETS)}"
                           f"{plugins.failure_note(plugins.DATASETS_GROUP)}")
    return _BUILDERS[name]


def _run_builder(name: str) -> BuiltDataset:
    built = _builder(name)()
    if not isinstance(built, BuiltDataset):
        raise DatasetError(f"data set '{name}': its builder returned {type(built).__name__}, expected a BuiltDataset")
    if built.schema.name != name:
        raise DatasetError(f"data set '{name}': its builder returned schema '{built.schema.name}'; the names "
                           "must match (runs and reports are labelled by the schema)")
    _check(built)
    return built


# --------------------------------------------------------------------------- writing


def _check(built: _Built) -> None:
    """Rules the manifest must meet before anything is written."""
    schema, frame = built.schema, built.frame
    data_cols = [c.name for c in schema.clinical] + list(schema.omics)
    if schema.visits is not None:
        data_cols += [schema.visits.time_column, *schema.visits.columns]
    clash = sorted(set(data_cols) & set(RESERVED_COLUMNS))
    if clash or len(set(data_cols)) != len(data_cols):
        raise DatasetError(f"{schema.name}: feature columns clash with reserved or repeated names: {clash}")
    if not frame["case_id"].is_unique:
        raise DatasetError(f"{schema.name}: case_id values are not unique")
    if schema.has_survival and not (frame["time"] > 0).all():
        raise DatasetError(f"{schema.name}: every time must be > 0")
    for col in schema.categorical_columns:
        bad = set(frame[col.name].dropna()) - set(col.categories)
        if bad:
            raise DatasetError(f"{schema.name}: column '{col.name}' has values outside {col.categories}: {bad}")


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def source_table(name: str) -> tuple[pd.DataFrame, Schema, bool]:
    """Data set ``name`` as one row per patient (``case_id``, ``site`` when real, targets, features; no
    split), its schema, and whether it has images or visits (files/rows a plain CSV export cannot hold)."""
    built = _run_builder(name)
    return built.frame, built.schema, built.images is not None or built.visits is not None


def build_dataset(name: str, out_dir: str | Path, seed: int = 0, on_step: StepCallback | None = None) -> Path:
    """Write ``schema.json``, ``manifest.csv`` (and ``images/``) for data set ``name`` into
    ``out_dir`` and return the schema path. Re-running overwrites; the same seed gives identical
    files, another seed another split (and, for rendered images, other random detail).
    ``on_step`` hears each stage (reading, rendering images, writing): a build takes seconds."""
    _builder(name)  # an unknown name fails before anything is reported
    out_dir = Path(out_dir)
    report(on_step, f"reading {name} from its package")
    built = _run_builder(name)
    frame, schema = built.frame, built.schema
    site = frame["site"] if schema.site_column else pd.Series("all", index=frame.index)
    strata = frame["label"] if schema.has_classification else frame["event"]
    split = assign_splits(site, strata, seed)
    cols = list(frame.columns)
    frame.insert(cols.index("site") + 1 if "site" in cols else 1, "split", split)

    out_dir.mkdir(parents=True, exist_ok=True)
    if built.images is not None:
        report(on_step, "rendering images", detail=f"{len(frame)} cases")
        built.images(out_dir, seed)
    if built.visits is not None and schema.visits is not None:  # long format: one row per visit
        frame = to_long_format(frame, built.visits, schema.visits.time_column)
    report(on_step, "writing manifest.csv and schema.json", detail=str(out_dir))
    # 8 significant digits: beyond any assay's precision, and it halves the wide omics files
    _atomic_write(out_dir / "manifest.csv", lambda p: frame.to_csv(p, index=False, float_format="%.8g"))
    schema_path = out_dir / "schema.json"
    _atomic_write(schema_path, schema.save)
    return schema_path


def main() -> None:  # pragma: no cover - convenience for `python -m fedfusion.simulations.datasets`
    import sys

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data")
    for info in list_datasets():
        start = time.perf_counter()
        try:
            path = build_dataset(info.name, out / info.name)
        except DatasetError as err:
            print(f"{info.name}: skipped ({err})")
            continue
        print(f"{info.name}: {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":  # pragma: no cover
    main()
