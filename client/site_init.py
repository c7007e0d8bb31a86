"""``fedfusion site init EXPORT.csv --out DIR``: a hospital's CSV export -> a proposed schema + manifest.

A researcher's first contact with fedfusion is a spreadsheet export, not a manifest. This module
guesses what a person would write by hand -- the id column, the task (survival from a time + an
event column, classification from a label/outcome column), each remaining column numeric or
categorical with its levels -- writes ``manifest.csv`` (the export with ``case_id`` and a seeded
stratified ``split`` column) and ``schema.json``, and returns the guesses so the command can print
them for a person to confirm. Every guess has an override flag (``--id``, ``--time``, ``--event``,
``--label``, ``--categorical``, ``--drop``, ``--omics``).

Several hospitals share one schema: when the schema file already exists (``--schema``, e.g. the
``sites/schema.json`` of ``simulate --sites-dir``), this site's columns must match it and the
categorical levels and classes are merged into it. Nothing leaves the machine.
"""

from __future__ import annotations

import csv
import fnmatch
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from fedfusion.common.config import ClinicalColumn, ConfigError, Schema, load_schema
from fedfusion.common.site_split import DEFAULT_SPLIT_SEED, MIN_SPLIT_ROWS, site_split

_ID_NAMES = re.compile(r"(^|_)(id|patient|patient_?id|case|case_?id|mrn|subject|record)($|_)", re.I)
_TIME_NAMES = re.compile(r"(time|follow|survival|duration|(^|_)(os|pfs|dfs|rfs)($|_))", re.I)
_TIME_UNITS = re.compile(r"(months?|days?|weeks?)$", re.I)  # weaker: "age_years" is not a follow-up time
_EVENT_NAMES = re.compile(r"(event|death|dead|died|status|recurrence|relapse|progress|censor|deceased)", re.I)
_LABEL_NAMES = re.compile(r"^(label|outcome|diagnosis|class|target|y|response|malignant)$", re.I)
_BLANK = ("", "na", "nan", "null", "none")
#: A text column with more distinct values than this (and mostly unique) is free text or an id, not a category.
MAX_LEVELS = 30


class SiteInitError(ValueError):
    """The export cannot be read or no schema can be proposed; the message says what to pass or fix."""


@dataclass
class Proposal:
    """What ``site init`` guessed, for a person to confirm (each line names the flag that overrides it)."""

    schema: Schema
    id_column: str
    rows: int
    delimiter: str
    split_counts: dict[str, int]
    dropped: dict[str, str] = field(default_factory=dict)  # column -> why
    merged_into: Path | None = None

    def lines(self) -> list[str]:
        s = self.schema
        out = [f"rows: {self.rows} (delimiter {self.delimiter!r})",
               f"id column: {self.id_column}  (--id COLUMN)"]
        if s.has_survival:
            out.append(f"task: survival, time = {s.time_column}, event = {s.event_column}  (--time, --event)")
        else:
            out.append(f"task: classification, label = {s.label_column}, classes {list(s.classes)}  (--label)")
        for col in s.clinical:
            what = f"categorical {list(col.categories)}" if col.kind == "categorical" else "numeric"
            out.append(f"  {col.name}: {what}")
        out.append("  (--categorical COL,COL makes numeric-looking codes categorical; --drop COL,COL leaves columns out)")
        if s.omics:
            out.append(f"omics: {len(s.omics)} feature columns ({s.omics[0]} .. {s.omics[-1]})  (--omics PATTERN)")
        for column, why in self.dropped.items():
            out.append(f"  left out {column}: {why}")
        out.append("split: " + ", ".join(f"{k}={v}" for k, v in self.split_counts.items())
                   + f" (seeded, stratified on {'event' if s.has_survival else 'label'}; --seed)")
        if self.merged_into is not None:
            out.append(f"schema merged into the existing {self.merged_into}")
        return out


def read_export(path: Path) -> tuple[pd.DataFrame, str]:
    """The export as text cells (header stripped) and its delimiter; clear errors for what Excel produces."""
    if not path.is_file():
        raise SiteInitError(f"{path}: file not found; expected the hospital's CSV export")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SiteInitError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file "
                            "as 'CSV UTF-8' (Excel: Save As > CSV UTF-8) and run again") from None
    first = text.splitlines()[0] if text.strip() else ""
    if not first:
        raise SiteInitError(f"{path}: the file is empty; expected a header line and one line per patient")
    delimiter = max((",", ";", "\t"), key=first.count)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, sep=delimiter, encoding="utf-8-sig",
                            skipinitialspace=True, quoting=csv.QUOTE_MINIMAL)
    except pd.errors.ParserError as err:
        raise SiteInitError(f"{path}: not a readable CSV file ({err})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    twice = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if twice:
        raise SiteInitError(f"{path}, line 1: column(s) {twice} appear more than once in the header")
    if len(frame.columns) < 3 or len(frame) == 0:
        raise SiteInitError(f"{path}: {len(frame.columns)} column(s), {len(frame)} row(s); expected an id, outcome "
                            "and clinical columns with one row per patient")
    return frame.apply(lambda c: c.str.strip()), delimiter


def _blank(series: pd.Series) -> pd.Series:
    return series.str.lower().isin(_BLANK)


def _is_numeric(series: pd.Series) -> bool:
    values = series[~_blank(series)]
    return len(values) > 0 and bool(pd.to_numeric(values, errors="coerce").notna().all())


def _is_binary(series: pd.Series) -> bool:
    values = set(series[~_blank(series)])
    return len(values) > 0 and values <= {"0", "1", "0.0", "1.0"}


def _pick(frame: pd.DataFrame, given: str | None, pattern: re.Pattern[str], ok, what: str, flag: str,
          path: Path) -> str | None:
    if given is not None:
        if given not in frame.columns:
            raise SiteInitError(f"{path}: {flag} {given!r} is not a column; columns are {list(frame.columns)}")
        return given
    found = [c for c in frame.columns if pattern.search(c) and ok(frame[c])]
    return found[0] if found else None


def propose(path: Path, *, name: str | None = None, id_column: str | None = None, time: str | None = None,
            event: str | None = None, label: str | None = None, categorical: tuple[str, ...] = (),
            drop: tuple[str, ...] = (), omics: tuple[str, ...] = (),
            seed: int = DEFAULT_SPLIT_SEED) -> tuple[Proposal, pd.DataFrame]:
    """Guess the schema of one export and build its manifest (``case_id`` first, then ``split``)."""
    frame, delimiter = read_export(path)
    missing = [c for c in (*categorical, *drop) if c not in frame.columns]
    if missing:
        raise SiteInitError(f"{path}: --categorical/--drop name(s) {missing} that are not columns; "
                            f"columns are {list(frame.columns)}")
    frame = frame.drop(columns=list(drop))
    unique = lambda s: not _blank(s).any() and s.is_unique  # noqa: E731
    id_col = _pick(frame, id_column, _ID_NAMES, unique, "id", "--id", path)
    if id_col is None:
        raise SiteInitError(f"{path}: no id column found (a column named like patient_id/case_id/mrn with unique, "
                            "non-empty values); pass --id COLUMN")
    if not unique(frame[id_col]):
        dupes = frame[id_col][frame[id_col].duplicated()].head(3).tolist()
        raise SiteInitError(f"{path}: --id {id_col!r} has empty or repeated values (e.g. {dupes}); expected one "
                            "unique id per patient")
    time_col = (_pick(frame, time, _TIME_NAMES, _is_numeric, "time", "--time", path)
                or _pick(frame, None, _TIME_UNITS, _is_numeric, "time", "--time", path))
    event_col = _pick(frame, event, _EVENT_NAMES, _is_binary, "event", "--event", path)
    label_col = _pick(frame, label, _LABEL_NAMES, lambda s: s[~_blank(s)].nunique() >= 2, "label", "--label", path)
    if label is None and time_col and event_col:
        label_col = None  # time + event found: survival, unless the user asked for a label too
    if label_col is None and not (time_col and event_col):
        raise SiteInitError(f"{path}: cannot tell the task: found time column {time_col!r}, event column "
                            f"{event_col!r}, no label column; pass --time COL --event COL (survival) or --label COL "
                            "(classification)")
    if label_col is not None:
        time_col = event_col = None  # classification: time/event-looking columns stay ordinary columns
    targets = {id_col, *(c for c in (time_col, event_col, label_col) if c)}
    dropped: dict[str, str] = {}
    clinical: list[ClinicalColumn] = []
    omics_cols: list[str] = []
    for column in frame.columns:
        if column in targets or column in ("split", "site"):
            continue
        series = frame[column]
        if _blank(series).all():
            dropped[column] = "empty in every row"
            continue
        if omics and any(fnmatch.fnmatchcase(column, p) for p in omics):
            omics_cols.append(column)
            continue
        if _is_numeric(series) and column not in categorical:
            clinical.append(ClinicalColumn(column))
            continue
        levels = sorted(set(series[~_blank(series)]), key=_level_key)
        if column not in categorical and len(levels) > MAX_LEVELS and len(levels) > 0.5 * len(series):
            dropped[column] = f"{len(levels)} distinct text values: free text or an id? (--categorical to keep it)"
            continue
        clinical.append(ClinicalColumn(column, kind="categorical", categories=tuple(levels)))
    task = "classification" if label_col is not None else "survival"
    try:
        schema = Schema(name=name or path.stem, task=task, clinical=tuple(clinical), omics=tuple(omics_cols),
                        classes=tuple(sorted(set(frame[label_col][~_blank(frame[label_col])]), key=_level_key))
                        if label_col else (),
                        label_column=label_col or "label", time_column=time_col or "time",
                        event_column=event_col or "event")
    except ConfigError as err:
        raise SiteInitError(f"{path}: {err}") from None
    if len(frame) < MIN_SPLIT_ROWS:
        raise SiteInitError(f"{path}: {len(frame)} patient row(s); a site needs at least {MIN_SPLIT_ROWS}")
    rest = frame.drop(columns=[c for c in ("split", "case_id", id_col) if c in frame.columns])
    strata = frame[label_col] if label_col else frame[event_col]  # type: ignore[index]
    split = site_split(strata, seed)
    manifest = pd.concat([pd.DataFrame({"case_id": frame[id_col], "split": split}), rest], axis=1)
    counts = {s: int((split == s).sum()) for s in ("train", "val", "test")}
    return Proposal(schema, id_col, len(frame), delimiter, counts, dropped), manifest


def _level_key(value: str) -> tuple[int, float, str]:
    """Numeric-looking levels in numeric order (stage 1 < 2 < 10), the rest alphabetically after them."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _targets_of(schema_path: Path, export: Path) -> dict[str, str]:
    """The outcome columns an existing schema names, where this export has them (else guess afresh)."""
    try:
        schema = load_schema(schema_path)
        header = set(read_export(export)[0].columns)
    except (ConfigError, SiteInitError):
        return {}
    if schema.has_classification:
        return {"label": schema.label_column} if schema.label_column in header else {}
    if {schema.time_column, schema.event_column} <= header:
        return {"time": schema.time_column, "event": schema.event_column}
    return {}


def merge_schema(existing: Schema, new: Schema, where: Path) -> Schema:
    """One federation schema for several hospitals: same task, columns and kinds; union of levels/classes."""
    problems = []
    for attr in ("task", "label_column", "time_column", "event_column", "omics"):
        if getattr(existing, attr) != getattr(new, attr):
            problems.append(f"{attr} is {getattr(new, attr)!r} here but {getattr(existing, attr)!r} in the schema")
    old = {c.name: c for c in existing.clinical}
    here = {c.name: c for c in new.clinical}
    if set(old) != set(here):
        problems.append(f"clinical columns differ: only in the schema {sorted(set(old) - set(here))}, only in this "
                        f"export {sorted(set(here) - set(old))} (rename, or --drop the extra ones)")
    for name in sorted(set(old) & set(here)):
        if old[name].kind != here[name].kind:
            problems.append(f"column {name!r} is {here[name].kind} here but {old[name].kind} in the schema "
                            "(--categorical, or fix the values)")
    if problems:
        raise SiteInitError(f"this export does not match {where}: " + "; ".join(problems))
    clinical = tuple(replace(c, categories=tuple(sorted(set(c.categories) | set(here[c.name].categories),
                                                        key=_level_key))) if c.kind == "categorical" else c
                     for c in existing.clinical)
    classes = tuple(sorted(set(existing.classes) | set(new.classes), key=_level_key))
    return replace(existing, clinical=clinical, classes=classes)


def init_site(export: Path, out_dir: Path, *, schema_path: Path | None = None, force: bool = False,
              **options) -> Proposal:
    """Write ``out_dir/manifest.csv`` and the schema (``schema_path``, default ``out_dir/schema.json``;
    merged when it exists); return the proposal to print."""
    schema_path = schema_path or out_dir / "schema.json"
    if schema_path.is_file() and not any(options.get(k) for k in ("time", "event", "label")):
        options.update(_targets_of(schema_path, export))  # the shared schema's outcome columns, not a new guess
    proposal, manifest = propose(export, **options)
    target = out_dir / "manifest.csv"
    if target.exists() and not force:
        raise SiteInitError(f"{target} exists; pass --force to replace it")
    schema = proposal.schema
    if schema_path.is_file():
        try:
            existing = load_schema(schema_path)
        except ConfigError as err:
            raise SiteInitError(str(err)) from None
        schema = merge_schema(existing, schema, schema_path)
        proposal.merged_into = schema_path
    out_dir.mkdir(parents=True, exist_ok=True)
    schema_path.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(target, index=False)
    schema.save(schema_path)
    proposal.schema = schema
    return proposal
