"""What a coordinator's run folder holds, finished or live, read without writing or running anything.

The round loop (``server/federation.py``) and ``server/report.py`` write:

- a **finished** run: ``metrics.csv`` (one row per round), ``site_metrics.csv`` (per site and round),
  ``summary.json`` (refusals, rejected replies, why a run ended early), ``model.pt``, ``report.md``;
- a **live** run: only ``run_config.json`` and ``checkpoints/round-NNNN.pt``. Each checkpoint carries the
  rounds so far, the strategy's per-site metrics and the refusals, so the newest one is the live state.
  It is read with ``torch.load(weights_only=True)`` and numpy allow-listed: a viewer never runs code
  from a file it displays.

Used by the coordinator dashboard; numbers are returned as written, every numeric column included, so
figures other parts add later (``secagg_*``, ``epsilon``, ``epsilon-budget``) need no change here.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_MARKERS = ("run_config.json", "metrics.csv", "checkpoints")
_SKIP_DIRS = {"data", "checkpoints", "images", "__pycache__"}
MAX_DEPTH = 3
TEXT_COLUMNS = {"site", "phase", "reason", "status"}
SECAGG_PREFIX = "secagg_"


@dataclass
class RunFolder:
    """One run folder as the page shows it; ``source`` says where the numbers came from."""

    key: str
    path: Path
    status: str = "starting"
    rounds: list[dict[str, Any]] = field(default_factory=list)
    site_metrics: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    run_config: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    ended: float | None = None
    updated: float = 0.0
    source: str = ""
    note: str = ""

    @property
    def live(self) -> bool:
        return self.status in ("starting", "running")

    @property
    def rounds_done(self) -> int:
        return max((int(r["round"]) for r in self.rounds if "round" in r), default=0)

    @property
    def total_rounds(self) -> int | None:
        value = self.run_config.get("num-server-rounds")
        return int(value) if isinstance(value, int | float) else None

    @property
    def primary_metric(self) -> str:
        keys = {k for m in self.site_metrics for k in m}
        return "c_index" if "c_index" in keys or any("eval_c_index" in r for r in self.rounds) else "auc"

    def summary(self) -> dict[str, Any]:
        return {"run": self.key, "status": self.status, "live": self.live, "rounds_done": self.rounds_done,
                "rounds_total": self.total_rounds, "started": self.started, "ended": self.ended,
                "updated": self.updated, "source": self.source, "note": self.note,
                "sites": len({str(m.get("site")) for m in self.site_metrics})}


def _value(key: str, text: str) -> Any:
    """A CSV cell as a number where it is one (``round`` as int); empty cells are absent, not zero."""
    if key in TEXT_COLUMNS:
        return text
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if key == "round" and number.is_integer() else number


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics CSV written by ``common.results.write_rows`` (union of keys, blanks absent)."""
    with path.open(newline="") as handle:
        return [{k: _value(k, v) for k, v in row.items() if k is not None and v not in ("", None)}
                for row in csv.DictReader(handle)]


def discover_runs(runs_dir: Path) -> dict[str, Path]:
    """Run folders under ``runs_dir`` (itself included), keyed by their path relative to it.

    A folder is a run when it holds ``run_config.json``, ``metrics.csv`` or ``checkpoints/``; the walk
    stops at a run and never enters data folders, so a simulation's images are not scanned."""
    found: dict[str, Path] = {}

    def walk(folder: Path, depth: int) -> None:
        if any((folder / marker).exists() for marker in RUN_MARKERS):
            found[folder.relative_to(runs_dir).as_posix()] = folder
            return
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted((e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)), key=lambda e: e.name)
        except OSError:
            return
        for entry in children:
            if entry.name not in _SKIP_DIRS and not entry.name.startswith("."):
                walk(Path(entry.path), depth + 1)

    if runs_dir.is_dir():
        walk(runs_dir, 0)
    return found


_CHECKPOINT_CACHE: dict[Path, tuple[tuple[Path, tuple[int, int]], dict[str, Any]]] = {}
_CACHE_LOCK = threading.Lock()


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely; the message names the file and what to do."""


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A checkpoint, unpickled with ``weights_only=True`` and numpy arrays/scalars as the only extra globals.

    Why: unpickling runs code named in the file, so whoever can write a run folder (a backup restore, a
    shared disk) could make ``--resume`` or the dashboard run it. Checkpoints hold only numbers, strings,
    lists, dicts and numpy arrays, which this loader allows; anything else is refused.
    """
    import pickle

    import numpy as np
    import torch

    core = getattr(np, "_core", None) or np.core
    allowed = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    try:
        with torch.serialization.safe_globals(allowed):
            raw = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than numbers, text and numpy arrays, so it "
            f"was not written by fedfusion or was altered ({first[:200]}). Move it out of the checkpoints folder to "
            "resume from the round before") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a fedfusion checkpoint (expected a dict, got {type(raw).__name__})")
    return raw


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    """A checkpoint's rounds, site metrics and refusals, unpickled with numpy as the only allowed globals.

    Cached by (mtime, size): the page refreshes every few seconds and a checkpoint holds the model."""
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        cached = _CHECKPOINT_CACHE.get(path.parent)
        if cached is not None and cached[0] == (path, stamp):
            return cached[1]
    raw = load_checkpoint_file(path)
    strategy = raw.get("strategy") or {}
    state = {"round": int(raw.get("round", 0)), "rounds": list(raw.get("rounds", [])),
             "site_metrics": list(strategy.get("site_metrics", [])), "rejected": list(strategy.get("rejected", [])),
             "refusals": list(raw.get("refusals", [])), "run_config": dict(raw.get("run_config", {}))}
    with _CACHE_LOCK:
        _CHECKPOINT_CACHE[path.parent] = ((path, stamp), state)  # one entry per run: its newest checkpoint
    return state


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def load_run(key: str, path: Path, now: float | None = None) -> RunFolder:
    """Read one run folder: the final CSVs when the run has finished, else its newest checkpoint."""
    now = time.time() if now is None else now
    run = RunFolder(key=key, path=path)
    try:
        run.run_config = json.loads((path / "run_config.json").read_text())
    except (OSError, ValueError):
        run.run_config = {}
    checkpoints = sorted((path / "checkpoints").glob("round-*.pt"))
    newest = checkpoints[-1] if checkpoints else None
    metrics_time, checkpoint_time = _mtime(path / "metrics.csv"), _mtime(newest) if newest else None
    run.started = _mtime(path / "run_config.json") or (_mtime(checkpoints[0]) if checkpoints else metrics_time)
    run.updated = max(t for t in (run.started, checkpoint_time, metrics_time, 0.0) if t is not None)
    # metrics.csv is written last; a checkpoint or run_config.json newer than it means a resumed, live run.
    if metrics_time is not None and metrics_time >= max(checkpoint_time or 0.0, run.started or 0.0):
        run.rounds = read_rows(path / "metrics.csv")
        if (path / "site_metrics.csv").is_file():
            run.site_metrics = read_rows(path / "site_metrics.csv")
        summary = _json(path / "summary.json")
        run.refusals, run.rejected = list(summary.get("refusals", [])), list(summary.get("rejected_replies", []))
        run.ended, run.source = metrics_time, "metrics.csv"
        run.note = str(summary.get("ended_early", ""))
        run.status = "ended early" if run.note else "finished"
        return run
    if newest is not None:
        try:
            state = load_checkpoint_state(newest)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: say so, keep serving the page
            run.note = f"{newest.name} could not be read safely ({type(err).__name__}); live figures unavailable"
        else:
            run.rounds, run.site_metrics = state["rounds"], state["site_metrics"]
            run.refusals, run.rejected = state["refusals"], state["rejected"]
            run.run_config = run.run_config or state["run_config"]
        run.source = f"checkpoints/{newest.name}"
    timeout = float(run.run_config.get("round-timeout", 3600.0) or 3600.0)
    idle = now - run.updated
    run.status = ("running" if newest else "starting") if idle < 2 * timeout + 60 else "stalled"
    if run.status == "stalled":
        run.note = run.note or f"no checkpoint for {idle / 60:.0f} min (longer than two round timeouts)"
    return run


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def site_table(run: RunFolder) -> list[dict[str, Any]]:
    """One row per site: rounds contributed, last round seen, refusals, dropouts, latest metric and ε.

    A dropout is a round (after the site first appeared) in which it neither trained nor refused. In a
    secure-aggregation round the server holds only the sum, so such rounds count for no site."""
    metric = run.primary_metric
    secure_rounds = {int(r["round"]) for r in run.rounds if any(k.startswith(SECAGG_PREFIX) for k in r)}
    sites: dict[str, dict[str, Any]] = {}

    def entry(site: Any) -> dict[str, Any]:
        return sites.setdefault(str(site), {"site": str(site), "seen": set(), "trained": set(), "refused": set(),
                                            "rejected": 0, "metric": None, "epsilon": None, "budget": None})

    for m in sorted(run.site_metrics, key=lambda m: int(m.get("round", 0))):
        row = entry(m.get("site"))
        row["seen"].add(int(m["round"]))
        if m.get("phase") == "train":
            row["trained"].add(int(m["round"]))
            if is_number(m.get("epsilon")):
                row["epsilon"] = float(m["epsilon"])
            if is_number(m.get("epsilon-budget")):
                row["budget"] = float(m["epsilon-budget"])
        elif m.get("phase") == "evaluate" and is_number(m.get(metric)):
            row["metric"] = float(m[metric])
    for r in run.refusals:
        row = entry(r.get("site"))
        row["refused"].add(int(r.get("round", 0)))
        row["seen"].add(int(r.get("round", 0)))
        if is_number(r.get("epsilon")):
            row["epsilon"] = max(float(r["epsilon"]), row["epsilon"] or 0.0)
    for r in run.rejected:
        if str(r.get("site")) in sites:
            sites[str(r.get("site"))]["rejected"] += 1
    done = run.rounds_done
    table = []
    for site in sorted(sites):
        row = sites[site]
        first = min(row["seen"], default=done + 1)
        expected = [r for r in range(max(first, 1), done + 1) if r not in secure_rounds]
        table.append({"site": site, "rounds_contributed": len(row["trained"]),
                      "last_seen": max(row["seen"], default=None), "in_last_round": done in row["seen"],
                      "refusals": len(row["refused"]), "dropouts": sum(1 for r in expected
                                                                       if r not in row["trained"] | row["refused"]),
                      "rejected": row["rejected"], metric: row["metric"], "epsilon": row["epsilon"],
                      "epsilon_budget": row["budget"]})
    return table


def numeric_columns(rows: list[dict[str, Any]], skip: tuple[str, ...] = ("round",)) -> list[str]:
    """Every column holding a number in some row, in first-seen order (new figures appear unasked)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in skip and k not in columns and is_number(v)]
    return columns
