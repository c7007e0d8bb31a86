"""Experiment tracking beside metrics.csv: TensorBoard event files and MLflow runs, per round and per site.

Why here: the round loop (``server/federation.py``) already builds each round's row (what metrics.csv
holds) and the strategy holds each site's rows (site_metrics.csv); logging the *same* dictionaries at
the same moment means the curves a researcher sees in TensorBoard or MLflow are the CSV numbers, not
a second computation that could drift from them.

Run config (all optional; ``tracking = ""`` logs nothing and creates no folder):

- ``tracking``: ``"tensorboard"``, ``"mlflow"`` or ``"tensorboard,mlflow"``.
- ``tracking-dir``: parent folder of ``tensorboard/`` and ``mlruns/``; ``""`` = the run folder. A shared
  folder gets one TensorBoard sub-folder per run (its run name) and one MLflow store for all runs.
- ``mlflow-tracking-uri``: an MLflow server or database (``http://...``, ``sqlite:///...``); ``""`` = the
  local file store ``<tracking-dir>/mlruns``. Nothing contacts a server unless this names one, and
  MLflow's usage telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY``, unless the user set it).
- ``mlflow-experiment``: the MLflow experiment (default ``fedfusion``).

Names: a round's value is logged under its metrics.csv column (``eval_auc``, ``train_loss``,
``round_overhead_seconds``, ...) with ``step = round`` (round 0 = the initial model); a site's value
under ``site/<site>/train_<metric>`` or ``site/<site>/eval_<metric>`` (site_metrics.csv's phase,
named like the round columns). Characters MLflow refuses in a name become ``_``.

Resume: only the rounds this process ran are logged. TensorBoard's writer purges any step at or
after the first logged one (``purge_step``), so a crash between a log and its checkpoint never shows
a round twice; MLflow continues the run recorded in ``<run-dir>/tracking.json``.

A tracker that fails after the run started (a server gone away) is dropped with one warning: the
federation and its CSV files matter more than the live curves. Failing to *start* is an error.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Protocol

from fedfusion.common.config import ConfigError

log = logging.getLogger("fedfusion.server.tracking")

BACKENDS = ("tensorboard", "mlflow")
EXTRA = 'pip install "fedfusion[tracking]"'
#: In the run folder: which MLflow run this run folder logs to, so a resume continues it.
STATE_FILE = "tracking.json"
#: Files of the run folder attached to the MLflow run once the report is written (those that exist).
REPORT_FILES = ("metrics.csv", "site_metrics.csv", "summary.json", "report.md", "run_config.json", "privacy.csv")
_PHASE_PREFIX = {"train": "train", "evaluate": "eval"}
_NOT_A_METRIC = ("round", "phase", "site")
_MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_MLFLOW_PARAMS = 100  # ... and of params


class TrackingUnavailable(ConfigError):
    """Tracking was asked for but its package is not installed (the ``tracking`` extra)."""


@dataclass(frozen=True)
class TrackingSettings:
    """What the run config asks for, resolved to folders and a URI."""

    backends: tuple[str, ...]
    run_dir: Path
    run_name: str
    tensorboard_dir: Path
    mlflow_uri: str
    mlflow_experiment: str

    @classmethod
    def from_run_config(cls, raw: Mapping[str, Any]) -> TrackingSettings:
        backends = parse_backends(str(raw.get("tracking", "") or ""))
        run_dir = Path(str(raw.get("run-dir") or "runs/latest")).resolve()
        study = str(raw.get("study", "") or "")
        run_name = study or "/".join(run_dir.parts[-2:])
        base = str(raw.get("tracking-dir", "") or "")
        root = Path(base).resolve() if base else run_dir
        # A shared folder holds many runs: TensorBoard shows each sub-folder as its own run.
        tensorboard = root / "tensorboard"
        if base:
            tensorboard = tensorboard.joinpath(*map(clean_name, run_name.split("/")))
        uri = str(raw.get("mlflow-tracking-uri", "") or "") or (root / "mlruns").as_uri()
        experiment = str(raw.get("mlflow-experiment", "") or "fedfusion")
        return cls(backends, run_dir, run_name, tensorboard, uri, experiment)


def parse_backends(value: str) -> tuple[str, ...]:
    """``"tensorboard, mlflow"`` -> ``("tensorboard", "mlflow")``; ``""`` -> ``()``; unknown names refused."""
    names = tuple(dict.fromkeys(part.strip().lower() for part in value.split(",") if part.strip()))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(f"run config: tracking = {value!r}: unknown {unknown}; use \"\" (off) or a comma-separated "
                          f"list of {list(BACKENDS)}")
    return names


def check_tracking(raw: Mapping[str, Any]) -> tuple[str, ...]:
    """Validate the tracking keys and import what they need, before any training starts.

    Callers that start Flower (``fedfusion simulate``, experiments) call this first: inside the
    simulation runtime a ServerApp error only surfaces as "ended without a result"."""
    backends = TrackingSettings.from_run_config(raw).backends
    for backend in backends:
        _import_backend(backend)
    return backends


def clean_name(text: str) -> str:
    """A name MLflow accepts as one path segment (letters, digits, ``_ - . space``); others become ``_``."""
    cleaned = re.sub(r"[^\w.\- ]", "_", str(text)).strip()
    return "_" if not cleaned or set(cleaned) == {"."} else cleaned


def _number(value: Any) -> float | None:
    """A loggable float, or None for text and other non-numbers (never logged)."""
    if isinstance(value, str | bytes) or not hasattr(value, "__float__"):
        return None  # bool, int, float and numpy scalars have __float__
    return float(value)


def round_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A round's values by metrics.csv column (``round`` is the step, not a value)."""
    out = {}
    for key, value in row.items():
        number = _number(value)
        if key != "round" and number is not None:
            out[clean_name(key)] = number
    return out


def site_scalars(site_rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each site's values of one round as ``site/<site>/<train|eval>_<metric>``."""
    out = {}
    for row in site_rows:
        prefix = f"site/{clean_name(row['site'])}/{_PHASE_PREFIX.get(str(row['phase']), clean_name(row['phase']))}_"
        for key, value in row.items():
            number = _number(value)
            if key not in _NOT_A_METRIC and number is not None:
                out[prefix + clean_name(key)] = number
    return out


class RunTracker(Protocol):
    """One tracking backend. ``start`` may fail (bad URI, no permission); later calls should not."""

    name: str

    def start(self, first_round: int) -> None: ...

    def log_round(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


def _import_backend(backend: str) -> ModuleType:
    """The backend's module, imported only when asked for: a site install never needs the extra."""
    module = "torch.utils.tensorboard" if backend == "tensorboard" else "mlflow"
    if backend == "mlflow":
        # MLflow's usage telemetry contacts mlflow.org from `import mlflow`; a coordinator must not.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise TrackingUnavailable(f"run config: tracking = \"{backend}\" needs the tracking extra "
                                  f"({err.name or module} is not importable): {EXTRA}") from None


class TensorBoardTracker:
    """Scalars in a TensorBoard event file (``tensorboard --logdir <folder>``)."""

    name = "tensorboard"

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._writer_class = _import_backend("tensorboard").SummaryWriter
        self._writer: Any = None

    def start(self, first_round: int) -> None:
        # purge_step: an earlier process may have logged this step (and later) before it crashed
        self._writer = self._writer_class(log_dir=str(self.logdir), purge_step=first_round)

    def log_round(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()  # a live `tensorboard` shows the round now, not at the end of the run

    def close(self, failed: bool) -> None:
        if self._writer is not None:
            self._writer.close()


@contextmanager
def _mlflow_file_store_allowed() -> Iterator[None]:
    """MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set, and reads it on every call.

    The file store is the offline store a coordinator without a server needs, so allow it around our
    own calls only (the process environment is left as it was)."""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    if before is None:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


class MlflowTracker:
    """One MLflow run per federated run: run config as params, values with ``step = round``."""

    name = "mlflow"

    def __init__(self, settings: TrackingSettings, params: Mapping[str, Any]) -> None:
        self.settings = settings
        self._params = {clean_name(k): str(v) for k, v in params.items()}
        mlflow = _import_backend("mlflow")
        self._entities = importlib.import_module("mlflow.entities")
        self._client_class = mlflow.MlflowClient
        self._client: Any = None
        self.run_id = ""

    def start(self, first_round: int) -> None:
        s = self.settings
        with _mlflow_file_store_allowed():
            client = self._client_class(tracking_uri=s.mlflow_uri)
            experiment = client.get_experiment_by_name(s.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(s.mlflow_experiment))
            self.run_id = self._resumable_run(client, experiment_id) if first_round > 0 else ""
            if self.run_id:
                client.update_run(self.run_id, status="RUNNING")
                known = set(client.get_run(self.run_id).data.params)
            else:
                tags = {"fedfusion.run_dir": str(s.run_dir)}
                self.run_id = client.create_run(experiment_id, run_name=s.run_name, tags=tags).info.run_id
                known = set()
            # Params are immutable in MLflow: a resume keeps the values the run started with
            params = [self._entities.Param(k, v) for k, v in sorted(self._params.items()) if k not in known]
            for i in range(0, len(params), _MLFLOW_PARAMS):
                client.log_batch(self.run_id, params=params[i:i + _MLFLOW_PARAMS])
            if first_round > 0:
                client.set_tag(self.run_id, "fedfusion.resumed_at_round", str(first_round))
        self._client = client
        (s.run_dir / STATE_FILE).write_text(json.dumps({"mlflow": {
            "tracking_uri": s.mlflow_uri, "experiment_id": experiment_id, "run_id": self.run_id}}, indent=2) + "\n")

    def _resumable_run(self, client: Any, experiment_id: str) -> str:
        """The run this folder logged to before, if it is in this store and experiment ("" otherwise)."""
        try:
            state = json.loads((self.settings.run_dir / STATE_FILE).read_text())["mlflow"]
        except (OSError, ValueError, KeyError, TypeError):
            return ""
        if state.get("tracking_uri") != self.settings.mlflow_uri or state.get("experiment_id") != experiment_id:
            return ""
        try:
            run = client.get_run(state["run_id"])
        except Exception:  # noqa: BLE001 - deleted or never there: start a new run
            return ""
        return str(run.info.run_id) if run.info.lifecycle_stage == "active" else ""

    def log_round(self, step: int, scalars: Mapping[str, float]) -> None:
        stamp = int(time.time() * 1000)
        metrics = [self._entities.Metric(k, v, stamp, step) for k, v in scalars.items()]
        with _mlflow_file_store_allowed():
            for i in range(0, len(metrics), _MLFLOW_BATCH):
                self._client.log_batch(self.run_id, metrics=metrics[i:i + _MLFLOW_BATCH])

    def close(self, failed: bool) -> None:
        if self._client is not None:
            with _mlflow_file_store_allowed():
                self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class RunTracking:
    """The trackers of one federated run, as a context manager around the round loop.

    Entering validates and imports (a missing extra fails before round 0); :meth:`start` opens the
    stores once the first round to log is known; leaving closes them, marking the MLflow run FAILED
    when the loop raised."""

    def __init__(self, raw: Mapping[str, Any], trackers: Sequence[RunTracker] | None = None) -> None:
        self.settings = TrackingSettings.from_run_config(raw)
        if trackers is None:
            trackers = [TensorBoardTracker(self.settings.tensorboard_dir) if b == "tensorboard"
                        else MlflowTracker(self.settings, raw) for b in self.settings.backends]
        self.trackers = list(trackers)
        self._started: list[RunTracker] = []

    def __enter__(self) -> RunTracking:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for tracker in self._started:
            try:
                tracker.close(failed=error is not None)
            except Exception as err:  # noqa: BLE001 - never hide the loop's own exception behind ours
                log.warning("tracking: closing %s failed: %s", tracker.name, err)
        self._started = []

    def start(self, first_round: int) -> None:
        """Open every store; an error here stops the run before its first round (fix the settings)."""
        for tracker in self.trackers:
            tracker.start(first_round)
            self._started.append(tracker)

    def log_round(self, row: Mapping[str, Any], site_rows: Sequence[Mapping[str, Any]]) -> None:
        """Log ``row`` (a metrics.csv row) and the site rows of its round (the rest are ignored)."""
        if not self._started:
            return
        step = int(row["round"])
        scalars = {**round_scalars(row), **site_scalars([m for m in site_rows if int(m["round"]) == step])}
        for tracker in list(self._started):
            try:
                tracker.log_round(step, scalars)
            except Exception as err:  # noqa: BLE001 - the federation goes on; its CSV files are complete
                log.warning("tracking: %s failed at round %d (%s); it logs nothing more in this run, metrics.csv "
                            "and site_metrics.csv are unaffected", tracker.name, step, err)
                self._started.remove(tracker)
                try:
                    tracker.close(failed=True)
                except Exception:  # noqa: BLE001
                    pass


def log_report_files(raw: Mapping[str, Any], run_dir: Path) -> list[str]:
    """Attach the run folder's report files to its MLflow run (after ``write_run_outputs``).

    Returns the names attached; ``[]`` when MLflow tracking is off. A failure is a warning: the files
    are in the run folder whatever happens to their copies."""
    settings = TrackingSettings.from_run_config({**raw, "run-dir": str(run_dir)})
    if "mlflow" not in settings.backends:
        return []
    try:
        state = json.loads((settings.run_dir / STATE_FILE).read_text())["mlflow"]
        client = _import_backend("mlflow").MlflowClient
        files = [settings.run_dir / n for n in REPORT_FILES] + sorted(settings.run_dir.glob("*.png"))
        files = [f for f in files if f.is_file()]
        with _mlflow_file_store_allowed():
            tracker = client(tracking_uri=state["tracking_uri"])
            for path in files:
                tracker.log_artifact(state["run_id"], str(path))
        return [f.name for f in files]
    except Exception as err:  # noqa: BLE001
        log.warning("tracking: attaching the report files to the MLflow run failed: %s", err)
        return []
