"""Site manifests: load a CSV, validate it against the federation schema, report every problem.

A hospital's data never leaves the site, so the only way the coordinator learns that a site's
table is wrong is a crash in the middle of a run. This module moves those failures to
``fedfusion site check``: :func:`load_manifest` collects *all* problems in one pass and raises a
single :class:`ManifestError` whose lines each name the file, the CSV line, the case, the column,
the bad value and what was expected.

Line numbers are the ones a spreadsheet or editor shows: the header is line 1, the first patient
line 2.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedfusion.common.config import Schema
from fedfusion.common.imaging import ImageReadError, read_image
from fedfusion.common.longitudinal import VISIT_TIMES, VISIT_VALUES, collapse_visits, visits_present
from fedfusion.common.manifest_columns import column_fill_problems
from fedfusion.common.manifest_text import UnreadableText, in_file_order, read_manifest_text
from fedfusion.common.site_split import DEFAULT_SPLIT_SEED, site_split

SPLITS = ("train", "val", "test")
RESERVED_COLUMNS = ("case_id", "site", "split", "omics")
_MAX_LISTED = 200


@dataclass(frozen=True)
class ManifestIssue:
    """One problem in a manifest; ``line`` is None for whole-file or whole-column problems."""

    file: str
    message: str
    line: int | None = None
    case_id: str | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.case_id is not None:
            where.append(f"case {self.case_id!r}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return ", ".join(where) + ": " + self.message


class ManifestError(ValueError):
    """A manifest failed validation; ``issues`` holds every problem found, not just the first."""

    def __init__(self, issues: list[ManifestIssue]):
        self.issues = issues
        shown = "\n".join(f"  - {issue}" for issue in issues[:_MAX_LISTED])
        more = f"\n  ... and {len(issues) - _MAX_LISTED} more" if len(issues) > _MAX_LISTED else ""
        super().__init__(f"{len(issues)} problem(s) in the site manifest:\n{shown}{more}")


@dataclass
class Manifest:
    """A validated manifest: ``frame`` holds typed values, one row per case, index 0..n-1.

    Numeric clinical/omics columns are float (NaN = missing), categorical columns are strings or
    None, each image modality's column (``image``, or ``image:<sequence>`` for a multi-sequence schema)
    holds absolute paths or None, ``split`` is always filled: without a split column in the file, the
    site draws a seeded split stratified on label/event (common/site_split.py), stated in ``split_note``.
    """

    path: Path
    schema: Schema
    frame: pd.DataFrame
    has_split_column: bool = True
    warnings: list[str] = field(default_factory=list)
    split_note: str = "from the manifest's split column"

    @property
    def root(self) -> Path:
        return self.path.parent

    def __len__(self) -> int:
        return len(self.frame)

    def rows(self, split: str | None) -> np.ndarray:
        """Row positions of one split (all rows for None)."""
        if split is None:
            return np.arange(len(self.frame))
        return np.flatnonzero(self.frame["split"].to_numpy() == split)

    def modality_present(self) -> pd.DataFrame:
        """Boolean frame (rows x schema.modalities): is the modality there for this case?"""
        present: dict[str, Any] = {}
        for modality in self.schema.modalities:
            if modality in self.schema.image_specs:
                present[modality] = self.frame[modality].notna()
            elif modality == "visits":
                present["visits"] = visits_present(self.frame)
            elif modality == "clinical":
                cols = [c.name for c in self.schema.clinical]
                present["clinical"] = self.frame[cols].notna().any(axis=1)
            else:
                if "omics" in self.frame.columns:
                    present["omics"] = self.frame["omics"].notna()
                else:
                    present["omics"] = self.frame[list(self.schema.omics)].notna().any(axis=1)
        return pd.DataFrame(present, index=self.frame.index)

    def summary(self) -> dict[str, Any]:
        """What ``site check`` prints: counts only, never patient values."""
        schema = self.schema
        out: dict[str, Any] = {
            "manifest": str(self.path),
            "rows": len(self.frame),
            "splits": {s: int((self.frame["split"] == s).sum()) for s in SPLITS},
            "modality_coverage": {m: float(v) for m, v in self.modality_present().mean().items()},
        }
        if schema.has_classification:
            counts = self.frame["label"].value_counts()
            out["labels"] = {c: int(counts.get(c, 0)) for c in schema.classes}
        if schema.has_survival:
            out["events"] = int(self.frame["event"].sum())
            out["median_time"] = float(self.frame["time"].median())
        if schema.visits is not None:
            counts = self.frame[VISIT_TIMES].map(len)
            out["visits"] = {"total": int(counts.sum()), "median_per_case": float(counts.median()),
                             "cases_without": int((counts == 0).sum())}
        if schema.clinical:
            out["clinical_missing"] = {
                c.name: float(self.frame[c.name].isna().mean()) for c in schema.clinical
            }
        return out


def load_manifest(
    path: str | Path,
    schema: Schema,
    *,
    check_images: bool = True,
    allow_single_class: bool = False,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> Manifest:
    """Read and validate a manifest; raise :class:`ManifestError` listing every problem.

    ``check_images`` opens every image once (slow for big sites, but it is what turns an
    unreadable scan into an error at check time rather than mid-round). ``allow_single_class``
    accepts a site whose training rows hold one class (useful for skewed simulated splits; a real
    site with one class cannot compute AUC and usually indicates a mistake). Without a ``split``
    column the site draws its split from ``split_seed`` (the same seed gives the same split in
    ``site check``, every federated message and the baselines).
    """
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise ManifestError([ManifestIssue(file, "manifest file not found; expected a CSV file")])
    try:
        text = read_manifest_text(path)
    except UnreadableText as err:
        raise ManifestError([ManifestIssue(file, message, line=line, column=column)
                             for message, line, column in err.problems]) from None
    try:
        raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
        header = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True, header=None,
                             nrows=1).iloc[0].astype(str).str.strip().tolist()
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ManifestError([ManifestIssue(file, f"not a readable CSV file ({err})")]) from None
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:  # pandas would silently rename the second one to "name.1" and read only the first
        raise ManifestError([ManifestIssue(file, f"column appears {header.count(name)} times in the header; "
                                           "expected each column once (more than once is ambiguous)",
                                           line=1, column=name) for name in twice])
    raw.columns = [str(c).strip() for c in raw.columns]
    if schema.visits is not None:
        manifest = _load_long(path, schema, raw, check_images=check_images, allow_single_class=allow_single_class)
    else:
        checker = _Checker(path, schema, raw)
        frame = checker.run(check_images=check_images, allow_single_class=allow_single_class)
        if checker.issues:
            raise ManifestError(in_file_order(checker.issues, list(raw.columns)))
        manifest = Manifest(path=path, schema=schema, frame=frame, has_split_column="split" in raw.columns,
                            warnings=checker.warnings)
    return manifest if manifest.has_split_column else _split_at_site(manifest, split_seed)


def _split_at_site(manifest: Manifest, seed: int) -> Manifest:
    """No split column: draw the site's seeded stratified split, so the site has test (and val) rows
    instead of training on everything and failing every evaluation with an empty test set."""
    frame, schema = manifest.frame, manifest.schema
    on = "label" if schema.has_classification else "event"
    strata = frame[on].astype(str) if on in frame.columns else pd.Series("all", index=frame.index)
    try:
        frame["split"] = site_split(strata, seed).to_numpy()
    except ValueError as err:
        raise ManifestError([ManifestIssue(str(manifest.path), f"no 'split' column and {err}; add a split "
                                           f"column (train/val/test) or more cases", column="split")]) from None
    named = schema.label_column if on == "label" else schema.event_column  # the column name the site knows
    manifest.split_note = f"made at the site (no split column), seed {seed}, stratified on {named}"
    return manifest


def _load_long(path: Path, schema: Schema, raw: pd.DataFrame, *, check_images: bool,
               allow_single_class: bool) -> Manifest:
    """A long-format (one row per visit) manifest: collapse to cases (common/longitudinal.py), then run
    every case-level check on each case's first row; line numbers stay the file's."""
    file, visit_issues = str(path), []
    long = collapse_visits(raw, schema, lambda msg, line, case, col: visit_issues.append(
        ManifestIssue(file, msg, line=line, case_id=case, column=col)))
    if long is None:
        raise ManifestError(visit_issues)
    checker = _Checker(path, schema, long.cases)
    frame = checker.run(check_images=check_images, allow_single_class=allow_single_class)
    if not checker.issues:
        frame[VISIT_TIMES] = pd.Series(long.times, dtype=object)
        frame[VISIT_VALUES] = pd.Series(long.values, dtype=object)
        checker.check_some_modality(frame)
    relined = [replace(i, line=long.lines[i.line - 2]) if i.line is not None else i for i in checker.issues]
    issues = in_file_order(visit_issues + relined, list(raw.columns))
    if issues:
        raise ManifestError(issues)
    warnings = checker.warnings
    if long.dropped:
        warnings.append(f"{file}: {long.dropped} visit(s) older than each case's last max_visits "
                        f"{schema.visits.max_visits} were not kept")  # type: ignore[union-attr]
    return Manifest(path=path, schema=schema, frame=frame, has_split_column="split" in raw.columns,
                    warnings=warnings)


def _is_blank(value: str) -> bool:
    return value.strip() == "" or value.strip().lower() in ("na", "nan", "null", "none")


class _Checker:
    """One validation pass; each ``_check_*`` fills one part of the typed frame and adds issues."""

    def __init__(self, path: Path, schema: Schema, raw: pd.DataFrame):
        self.path = path
        self.file = str(path)
        self.schema = schema
        self.raw = raw
        self.issues: list[ManifestIssue] = []
        self.warnings: list[str] = []
        self.case_ids = raw["case_id"].str.strip().tolist() if "case_id" in raw.columns else [None] * len(raw)

    def issue(self, message: str, row: int | None = None, column: str | None = None) -> None:
        line = None if row is None else row + 2
        case = None if row is None else self.case_ids[row]
        self.issues.append(ManifestIssue(self.file, message, line=line, case_id=case, column=column))

    def run(self, *, check_images: bool, allow_single_class: bool) -> pd.DataFrame:
        schema = self.schema
        if len(self.raw) == 0:
            self.issue("the manifest has no patient rows; expected at least one case")
            return pd.DataFrame()
        required = ["case_id"]
        if schema.has_classification:
            required.append(schema.label_column)
        if schema.has_survival:
            required += [schema.time_column, schema.event_column]
        required += [c.name for c in schema.clinical]
        if schema.omics and "omics" not in self.raw.columns:
            required += list(schema.omics)
        missing = [c for c in required if c not in self.raw.columns]
        if missing:
            listed = missing[:20] + (["..."] if len(missing) > 20 else [])
            self.issue(f"missing required column(s) {listed}; the schema '{schema.name}' expects them")
            return pd.DataFrame()

        frame = pd.DataFrame(index=self.raw.index)
        frame["case_id"] = self._check_case_ids()
        frame["split"] = self._check_split()
        if "site" in self.raw.columns:
            frame["site"] = self.raw["site"].str.strip()
        if schema.has_classification:
            frame["label"] = self._check_labels(allow_single_class, frame["split"])
        if schema.has_survival:
            frame["time"], frame["event"] = self._check_survival()
        for col in schema.numeric_columns:
            frame[col.name] = self._numeric(col.name, "a number, or empty for missing")
        for col in schema.categorical_columns:
            frame[col.name] = self._categorical(col.name, col.categories)
        if schema.omics:
            if "omics" in self.raw.columns:
                frame["omics"] = self._paths("omics", check_readable=False)
            else:
                omics = {name: self._numeric(name, "a number (omics feature), or empty for missing")
                         for name in schema.omics}
                frame = pd.concat([frame, pd.DataFrame(omics, index=self.raw.index)], axis=1)
        for modality, spec in schema.image_specs.items():
            column = spec.column
            what = "an image" if modality == "image" else f"a '{spec.name}' image"
            if column in self.raw.columns:
                frame[modality] = self._paths(column, check_readable=check_images)
            else:
                frame[modality] = None
                self.warnings.append(f"{self.file}: no '{column}' column: no case at this site has {what}")
        self._check_column_fill()
        if not self.issues and (frame["split"] == "train").sum() == 0:
            self.issue("no rows in the 'train' split; a site needs training cases", column="split")
        if not self.issues and schema.visits is None:  # long format: checked once visits are attached
            self.check_some_modality(frame)
        return frame.reset_index(drop=True)

    def _check_column_fill(self) -> None:
        """An entirely empty clinical/omics column is an error, a mostly empty one a warning
        (common/manifest_columns.py says why)."""
        groups = {"clinical": [c.name for c in self.schema.clinical]}
        if self.schema.omics and "omics" not in self.raw.columns:
            groups["omics"] = list(self.schema.omics)
        columns = [c for names in groups.values() for c in names]
        absent_ok = frozenset(c.name for c in self.schema.clinical if c.may_be_absent)
        errors, warnings = column_fill_problems(self.raw[columns].map(_is_blank), groups, self.file, absent_ok)
        for column, message in errors:
            self.issue(message, column=column)
        self.warnings += warnings

    def check_some_modality(self, frame: pd.DataFrame) -> None:
        """A case with every modality blank carries nothing to learn from; the model refuses such a row."""
        typed = Manifest(path=self.path, schema=self.schema, frame=frame.reset_index(drop=True), has_split_column=True)
        empty = np.flatnonzero(~typed.modality_present().any(axis=1).to_numpy())
        for row in empty[:50]:
            self.issue(f"this case has no data in any modality {list(self.schema.modalities)}; expected at least "
                       "one (or leave the case out of the manifest)", row=int(row))
        if len(empty) > 50:
            self.issue(f"... and {len(empty) - 50} more cases with no data in any modality")

    def _check_case_ids(self) -> pd.Series:
        ids = pd.Series(self.case_ids, index=self.raw.index)
        for row in np.flatnonzero(ids.map(lambda v: v is None or v == "")):
            self.issue("empty case_id; every row needs a unique case identifier", row, "case_id")
        seen: dict[str, int] = {}
        for row, value in enumerate(ids):
            if not value:
                continue
            if value in seen:
                self.issue(f"duplicate case_id {value!r} (first seen on line {seen[value] + 2}); "
                           "expected one row per case", row, "case_id")
            else:
                seen[value] = row
        return ids

    def _check_split(self) -> pd.Series:
        if "split" not in self.raw.columns:
            return pd.Series("train", index=self.raw.index)
        split = self.raw["split"].str.strip().str.lower()
        for row in np.flatnonzero(~split.isin(SPLITS)):
            self.issue(f"split {self.raw['split'].iloc[row]!r} is not one of {list(SPLITS)}", row, "split")
        return split

    def _check_labels(self, allow_single_class: bool, split: pd.Series) -> pd.Series:
        column = self.schema.label_column
        labels = self.raw[column].str.strip()
        allowed = list(self.schema.classes)
        bad = ~labels.isin(allowed)
        for row in np.flatnonzero(bad):
            value = labels.iloc[row]
            what = "missing label" if value == "" else f"unknown label {value!r}"
            self.issue(f"{what}; expected one of {allowed}", row, column)
        train_labels = labels[(split == "train") & ~bad]
        if not bad.any() and len(train_labels) and train_labels.nunique() < 2 and not allow_single_class:
            only = train_labels.iloc[0]
            self.issue(f"every training case has label {only!r}: a single-class site cannot learn or be "
                       f"scored (AUC); expected at least two of {allowed} (pass allow_single_class / "
                       "--allow-single-class for deliberately skewed simulated splits)", column=column)
        return labels

    def _check_survival(self) -> tuple[pd.Series, pd.Series]:
        tcol, ecol = self.schema.time_column, self.schema.event_column
        time = self._numeric(tcol, "a positive follow-up time", allow_missing=False)
        for row in np.flatnonzero(time.notna() & (time <= 0)):
            self.issue(f"time {self.raw[tcol].iloc[row]!r} is not positive; expected follow-up time > 0",
                       row, tcol)
        event = self._numeric(ecol, "0 (censored) or 1 (event)", allow_missing=False)
        for row in np.flatnonzero(event.notna() & ~event.isin([0.0, 1.0])):
            self.issue(f"event {self.raw[ecol].iloc[row]!r} is not 0 or 1; expected 0 (censored) or 1 "
                       "(event)", row, ecol)
        return time, event

    def _numeric(self, column: str, expected: str, allow_missing: bool = True) -> pd.Series:
        text = self.raw[column]
        blank = text.map(_is_blank)
        values = pd.to_numeric(text.where(~blank), errors="coerce")
        for row in np.flatnonzero(~blank & values.isna()):
            self.issue(f"value {text.iloc[row]!r} is not a number; expected {expected}", row, column)
        for row in np.flatnonzero(~blank & np.isinf(values.fillna(0.0))):
            self.issue(f"value {text.iloc[row]!r} is infinite; expected {expected}", row, column)
        if not allow_missing:
            for row in np.flatnonzero(blank):
                self.issue(f"missing value; expected {expected}", row, column)
        return values.astype(float).where(~np.isinf(values.fillna(0.0)))

    def _categorical(self, column: str, categories: tuple[str, ...]) -> pd.Series:
        text = self.raw[column].str.strip()
        blank = text.map(_is_blank)
        for row in np.flatnonzero(~blank & ~text.isin(categories)):
            self.issue(f"unknown category {text.iloc[row]!r}; expected one of {list(categories)} "
                       "or empty for missing", row, column)
        return text.where(~blank, None)

    def _paths(self, column: str, check_readable: bool) -> pd.Series:
        """Resolve per-case file paths; they must stay inside the manifest's folder."""
        root = self.path.parent.resolve()
        out: list[str | None] = []
        for row, value in enumerate(self.raw[column].str.strip()):
            if _is_blank(value):
                out.append(None)
                continue
            candidate = (root / value).resolve()
            if not candidate.is_relative_to(root):
                self.issue(f"path {value!r} points outside the manifest folder {root}; expected a path "
                           "relative to the manifest, inside its folder", row, column)
                out.append(None)
                continue
            if not candidate.is_file():
                self.issue(f"file {value!r} not found (looked for {candidate})", row, column)
                out.append(None)
                continue
            if check_readable:
                self._check_image(candidate, value, row, column)
            out.append(str(candidate))
        return pd.Series(out, index=self.raw.index, dtype=object)

    def _check_image(self, path: Path, value: str, row: int, column: str) -> None:
        try:
            array = read_image(path)
        except ImageReadError as err:
            self.issue(f"image {value!r} is unreadable: {err}", row, column)
            return
        channels_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
        if not channels_ok or min(array.shape[:2]) < 2:
            self.issue(f"image {value!r} has shape {tuple(array.shape)}; expected a 2-D image "
                       "(height, width) or (height, width, 1|3|4 channels)", row, column)
