"""A researcher's own per-site data (``--sites-dir DIR`` / study key ``sites-dir``) as simulation sites.

``DIR/schema.json`` plus one sub-folder per site holding ``manifest.csv``; the sub-folder name is the
site id. :func:`prepare_user_sites` writes the same data folder a shipped data set gets
(``schema.json``, ``manifest.csv`` = all sites with ``site`` and ``split`` columns, and
``site-<id>.csv`` per site), so federated, pooled and local-only runs, seeds and the report follow the
one path ``simulate.prepare_sites`` feeds. The user's folder is only read, never written.

Each site keeps its own ``split`` column; without one, the split is the one the site itself draws
(``load_manifest``: common/site_split.py, seeded with the run's seed, stratified on label or event),
and ``splits.json`` records which, for the report.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from fedfusion.common.config import ConfigError, load_schema
from fedfusion.common.manifest import load_manifest

SITE_MANIFEST = "manifest.csv"
SITES_SCHEMA = "schema.json"
SPLITS_FILE = "splits.json"
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SitesDirError(ValueError):
    """The sites folder is not laid out as documented; the message names the folder and what to fix."""


def find_sites(sites_dir: Path) -> dict[str, Path]:
    """Site id -> its manifest, sorted by id; raises :class:`SitesDirError` for a wrong layout."""
    if not sites_dir.is_dir():
        raise SitesDirError(f"{sites_dir}: not a folder; --sites-dir expects a folder with schema.json and "
                            f"one sub-folder per site holding {SITE_MANIFEST}")
    if not (sites_dir / SITES_SCHEMA).is_file():
        raise SitesDirError(f"{sites_dir}: no {SITES_SCHEMA}; write one with `fedfusion site init EXPORT.csv --out "
                            f"{sites_dir}/SITE` (docs/schema.md)")
    sites: dict[str, Path] = {}
    for folder in sorted(p for p in sites_dir.iterdir() if p.is_dir()):
        if not (folder / SITE_MANIFEST).is_file():
            continue
        if not _SITE_ID.match(folder.name):
            raise SitesDirError(f"{folder}: site folder names are site ids: letters, digits, '_', '.', '-' "
                                "(starting with a letter or digit)")
        sites[folder.name] = folder / SITE_MANIFEST
    if len(sites) < 2:
        raise SitesDirError(f"{sites_dir}: found {len(sites)} site folder(s) with {SITE_MANIFEST} "
                            f"({sorted(sites)}); a federation needs at least 2")
    return sites


def prepare_user_sites(sites_dir: Path, data_dir: Path, seed: int) -> tuple[Path, dict[str, Path]]:
    """Validate every site (all problems of a site at once, as ``site check``) and write the data folder.

    Tables only: a schema with images or a manifest with an ``omics`` file column is refused, because
    their paths are relative to each site's folder and would point outside the shared data folder.
    """
    sites = find_sites(sites_dir)
    try:
        schema = load_schema(sites_dir / SITES_SCHEMA)
    except ConfigError as err:
        raise SitesDirError(f"{sites_dir / SITES_SCHEMA}: {err}") from None
    if schema.visits is not None:
        raise SitesDirError(f"{sites_dir / SITES_SCHEMA}: --sites-dir does not take long-format (visits) "
                            "schemas yet; one row per patient is expected")
    if schema.image_specs:
        raise SitesDirError(f"{sites_dir / SITES_SCHEMA}: --sites-dir runs tabular schemas (clinical, omics "
                            "columns) for now; images need `fedfusion datasets build`-style single data folders")
    data_dir.mkdir(parents=True, exist_ok=True)
    schema_path = data_dir / SITES_SCHEMA
    shutil.copyfile(sites_dir / SITES_SCHEMA, schema_path)
    frames, out, notes = [], {}, {}
    for site, path in sites.items():
        manifest = load_manifest(path, schema, check_images=False, split_seed=seed)
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        raw.columns = [str(c).strip() for c in raw.columns]
        if "omics" in raw.columns:
            raise SitesDirError(f"{path}: an 'omics' file column is not supported with --sites-dir; put the "
                                "features in columns named as the schema's omics list")
        rest = raw.drop(columns=[c for c in ("case_id", "site", "split") if c in raw.columns])
        raw = pd.concat([pd.DataFrame({"case_id": raw["case_id"], "site": site,
                                       "split": manifest.frame["split"].to_numpy()}), rest], axis=1)
        out[site] = data_dir / f"site-{site}.csv"
        raw.to_csv(out[site], index=False)
        frames.append(raw)
        notes[site] = _split_counts(manifest.frame, manifest.split_note, schema.has_survival)
    pd.concat(frames, ignore_index=True).to_csv(data_dir / "manifest.csv", index=False)
    (data_dir / SPLITS_FILE).write_text(json.dumps({"sites_dir": str(sites_dir.resolve()), "sites": notes},
                                                   indent=2))
    return schema_path, out


def _split_counts(frame: pd.DataFrame, note: str, survival: bool) -> dict[str, Any]:
    row: dict[str, Any] = {s: int((frame["split"] == s).sum()) for s in ("train", "val", "test")}
    if survival:
        row["test_events"] = int(frame.loc[frame["split"] == "test", "event"].sum())
    row["split"] = note
    return row


def split_lines(data_dir: Path) -> list[str]:
    """The report's "Sites and splits" section (empty for shipped data sets: no splits.json)."""
    path = data_dir / SPLITS_FILE
    if not path.is_file():
        return []
    info = json.loads(path.read_text())
    lines = ["## Sites and splits", "", f"Sites: the sub-folders of `{info['sites_dir']}` (your data).", "",
             "| site | train | val | test | " + ("test events | " if any("test_events" in r for r in
                                                                     info["sites"].values()) else "") + "split |",
             "|---|---|---|---|" + ("---|" if any("test_events" in r for r in info["sites"].values()) else "")
             + "---|"]
    for site, row in info["sites"].items():
        events = f" {row['test_events']} |" if "test_events" in row else ""
        lines.append(f"| {site} | {row['train']} | {row['val']} | {row['test']} |{events} {row['split']} |")
    return lines + [""]

