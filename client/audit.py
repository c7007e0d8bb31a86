"""The site audit log: one JSON line for every reply that left the site, never the values it carried.

Why it exists: a hospital must be able to show, after the fact, exactly what its server sent to the
coordinator (which run, which round, which tensors, how large, how much privacy budget it spent) without
trusting the coordinator's word. The log is written at the site, by the site, before the reply leaves.

One line per reply, a JSON object with these keys (``v`` is the format version)::

    {"v": 1, "time": "2026-11-23T10:15:02.123456+00:00", "site_id": "study-16", "run_id": 4711,
     "round": 3, "message_type": "train",
     "tensors": [{"name": "head.weight", "shape": [2, 64], "dtype": "float32", "nbytes": 512,
                  "l2_norm": 1.93}, ...],
     "num_tensors": 42, "payload_bytes": 123456, "metrics": {"num-examples": 120, "loss": 0.53},
     "epsilon": 0.84, "sha256": "9f2c..."}

Tensor *values* are never written: only name, shape, dtype, byte count and L2 norm (computed in float64;
for a one-element tensor the norm is its magnitude, a number that left the site inside the update anyway).
The metrics are written as sent, because they leave the site verbatim (example counts, loss, ε).

``sha256`` is :func:`~fedfusion.common.reply_digest.payload_sha256` of exactly what the reply carried,
defined (in that module) so that anyone holding the reply (the coordinator, an auditor, a test) can
recompute it from the arrays and metrics alone. The coordinator does, for every reply it receives
(``replies.jsonl`` in the run folder), with the same function: the two sets must be equal.
``node_id`` is the site's Flower node id, as the coordinator sees it.

Writing is safe with several writers (ClientApp processes forked per message): each line is encoded
first, then written with a single ``os.write`` on a descriptor opened with ``O_APPEND``, then
``fsync``-ed, so lines never interleave and a line that was recorded survives a power cut.

Where the log lives: ``[site] audit-log`` in ``site.toml`` if set (relative paths resolve against the
file's folder), else ``audit.jsonl`` next to ``site.toml`` (:func:`audit_path_for`). Deployments whose
config folder is read-only (systemd's ``ProtectSystem=strict``, a Kubernetes Secret) set the key to a
path in the site's state folder.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedfusion.common.config import ConfigError, read_site_toml
from fedfusion.common.reply_digest import HashState, finish_sha256
from fedfusion.common.reply_digest import canonical as _canonical
from fedfusion.common.reply_digest import jsonable as _jsonable
from fedfusion.common.reply_digest import payload_sha256 as payload_sha256  # re-exported: the log's hash
from fedfusion.common.reply_digest import tensors_sha256 as _tensors_sha256
from fedfusion.common.results import append_line

FORMAT_VERSION = 1
DEFAULT_FILENAME = "audit.jsonl"
EXIT_OK = 0
EXIT_INVALID = 2
_FILE_MODE = 0o640  # the service user writes, the site's IT group may read; nobody else
# The reply metric that carries ε (fedfusion.common.records.EPSILON_KEY; not imported, since that module
# pulls in torch and `fedfusion site audit` should start instantly). A test keeps the two equal.
EPSILON_METRIC = "epsilon"


class AuditLogError(ValueError):
    """The audit log cannot be read as one JSON record per line (torn, edited or not an audit log)."""


def audit_path_for(site_config_path: str | Path) -> Path:
    """The audit log of the site configured by ``site_config_path`` (``[site] audit-log`` or the default).

    Both the writer (the site's ClientApp) and ``fedfusion site audit`` call this, so they cannot
    disagree about where the log is.
    """
    path = Path(site_config_path)
    raw = read_site_toml(path)
    site = raw.get("site", {})
    value = site.get("audit-log") if isinstance(site, dict) else None
    if value is None:
        return path.resolve().parent / DEFAULT_FILENAME
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: [site] audit-log must be a file path")
    candidate = Path(value)
    return candidate if candidate.is_absolute() else (path.resolve().parent / candidate).resolve()


def _l2_norm(array: np.ndarray) -> float | str:
    """Float64 L2 norm; a string for non-finite results so the line stays strict JSON."""
    if array.dtype.kind not in "biuf":
        return "n/a"
    norm = float(np.sqrt(np.sum(np.square(array, dtype=np.float64))))
    return norm if math.isfinite(norm) else ("NaN" if math.isnan(norm) else "Infinity")


def describe_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    """What the log keeps about one tensor: never its values."""
    array = np.asarray(array)
    return {
        "name": name,
        "shape": list(array.shape),
        "dtype": array.dtype.name,
        "nbytes": int(array.nbytes),
        "l2_norm": _l2_norm(array),
    }


class AuditLog:
    """Append-only JSON-lines log of the replies that left one site.

    ``record_reply`` is called once per reply, with the exact tensors and metrics the reply carries, just
    before the reply is returned to Flower. Instances hold no open file, so any number of processes may
    create their own and append to the same path.
    """

    def __init__(self, path: str | Path, site_id: str | None = None) -> None:
        self.path = Path(path)
        self.site_id = site_id

    def record_reply(
        self,
        tensors: Mapping[str, np.ndarray],
        metrics: Mapping[str, Any],
        *,
        run_id: int | str,
        server_round: int,
        message_type: str,
        site_id: str | None = None,
        epsilon: float | None = None,
        node_id: int | None = None,
        tensors_sha256: HashState | None = None,
    ) -> dict[str, Any]:
        """Append one line describing a reply; return the record written.

        ``tensors`` maps array names to numpy arrays exactly as sent (masked integers when secure
        aggregation is on); ``metrics`` is what the reply's MetricRecord/ConfigRecord carry; ``epsilon``
        is the ε spent so far, as the reply reports it (default: the ``epsilon`` metric, if the reply
        carries one; None when DP is off); ``node_id`` the site's Flower node id (written when given);
        ``tensors_sha256`` the :func:`~fedfusion.common.reply_digest.tensors_sha256` state of exactly these
        tensors when the caller already has it (the audit mod: the signing mod hashed them), so megabytes
        of tensors are not hashed a second time; the metrics are always hashed here, as logged.
        """
        site = site_id if site_id is not None else self.site_id
        if not site:
            raise ValueError("the audit log needs the site id (AuditLog(path, site_id) or record_reply(site_id=))")
        if epsilon is None and isinstance(metrics.get(EPSILON_METRIC), int | float | np.number):
            epsilon = float(metrics[EPSILON_METRIC])
        arrays = {name: np.asarray(value) for name, value in tensors.items()}
        clean_metrics = _jsonable(metrics)
        described = [describe_tensor(name, arrays[name]) for name in sorted(arrays)]
        record: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            "site_id": str(site),
            "run_id": run_id if isinstance(run_id, int) else str(run_id),
            "round": int(server_round),
            "message_type": str(message_type),
            "tensors": described,
            "num_tensors": len(described),
            "payload_bytes": sum(t["nbytes"] for t in described) + len(_canonical(clean_metrics)),
            "metrics": clean_metrics,
            "epsilon": None if epsilon is None else _jsonable(float(epsilon)),
            "sha256": finish_sha256(tensors_sha256 if tensors_sha256 is not None else _tensors_sha256(arrays),
                                    metrics),
        }
        if node_id is not None:
            record["node_id"] = int(node_id)
        self._append(json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n")
        return record

    def _append(self, line: bytes) -> None:
        append_line(self.path, line, _FILE_MODE)

    def records(self) -> Iterator[dict[str, Any]]:
        return iter_records(self.path)


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every record in file order; a line that is not a whole JSON record is an error, never skipped,
    because a silently skipped line is exactly what an audit must not hide."""
    path = Path(path)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                raise AuditLogError(f"{path}:{number}: last line is incomplete (torn write or edited file)")
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise AuditLogError(f"{path}:{number}: not a JSON audit record") from None
            if not isinstance(record, dict) or not {"run_id", "round", "message_type", "sha256"} <= record.keys():
                raise AuditLogError(f"{path}:{number}: not a fedfusion audit record")
            yield record


def filter_records(
    records: Iterable[dict[str, Any]], *, run: int | str | None = None, server_round: int | None = None
) -> Iterator[dict[str, Any]]:
    """Records of one run and/or round; run ids compare as text so ``--run 4711`` matches ``4711``."""
    for record in records:
        if run is not None and str(record["run_id"]) != str(run):
            continue
        if server_round is not None and int(record["round"]) != int(server_round):
            continue
        yield record


@dataclass
class RoundSummary:
    """What left the site in one round of one run."""

    replies: int = 0
    message_types: dict[str, int] = field(default_factory=dict)
    payload_bytes: int = 0
    last_epsilon: float | str | None = None
    first_time: str | None = None
    last_time: str | None = None


@dataclass
class RunSummary:
    """What left the site in one run; ``last_epsilon`` is the ε of the run's last line that had one."""

    replies: int = 0
    payload_bytes: int = 0
    last_epsilon: float | str | None = None
    site_ids: list[str] = field(default_factory=list)
    rounds: dict[int, RoundSummary] = field(default_factory=dict)


def summarise(
    path: str | Path, *, run: int | str | None = None, server_round: int | None = None
) -> dict[str, RunSummary]:
    """Per run (keyed by run id as text) and per round: reply counts, bytes and the last ε, in file order."""
    runs: dict[str, RunSummary] = {}
    for record in filter_records(iter_records(path), run=run, server_round=server_round):
        summary = runs.setdefault(str(record["run_id"]), RunSummary())
        rnd = summary.rounds.setdefault(int(record["round"]), RoundSummary())
        nbytes = int(record.get("payload_bytes", 0))
        for part in (summary, rnd):
            part.replies += 1
            part.payload_bytes += nbytes
            if record.get("epsilon") is not None:
                part.last_epsilon = record["epsilon"]
        kind = str(record["message_type"])
        rnd.message_types[kind] = rnd.message_types.get(kind, 0) + 1
        rnd.first_time = rnd.first_time or record.get("time")
        rnd.last_time = record.get("time")
        site = str(record.get("site_id", ""))
        if site not in summary.site_ids:
            summary.site_ids.append(site)
    return runs


def summary_to_dict(runs: Mapping[str, RunSummary]) -> dict[str, Any]:
    """JSON-ready form of :func:`summarise` (round numbers become string keys)."""
    return {
        run_id: {**asdict(s), "rounds": {str(r): asdict(v) for r, v in sorted(s.rounds.items())}}
        for run_id, s in runs.items()
    }


def audit_command(
    site_config: str | Path,
    *,
    run: str | None = None,
    server_round: int | None = None,
    as_json: bool = False,
    show_records: bool = False,
) -> int:
    """``fedfusion site audit``: print what left this site; exit 2 on a missing config or a damaged log."""
    try:
        path = audit_path_for(site_config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    if not path.is_file():
        print(f"no reply has left this site yet (no audit log at {path})", file=sys.stderr)
        if as_json:
            print("{}")
        return EXIT_OK
    try:
        if show_records:
            for record in filter_records(iter_records(path), run=run, server_round=server_round):
                print(json.dumps(record, separators=(",", ":")))
            return EXIT_OK
        runs = summarise(path, run=run, server_round=server_round)
    except AuditLogError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    if as_json:
        print(json.dumps(summary_to_dict(runs), indent=2))
        return EXIT_OK
    _print_table(path, runs)
    return EXIT_OK


def _print_table(path: Path, runs: Mapping[str, RunSummary]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"replies that left this site ({path})")
    for column in ("run", "round", "replies", "types", "bytes", "ε (last)"):
        table.add_column(column)
    for run_id, summary in runs.items():
        for rnd, part in sorted(summary.rounds.items()):
            types = ", ".join(f"{k}×{v}" for k, v in sorted(part.message_types.items()))
            eps = "-" if part.last_epsilon is None else str(part.last_epsilon)
            table.add_row(run_id, str(rnd), str(part.replies), types, f"{part.payload_bytes:,}", eps)
    if not runs:
        table.caption = "no matching replies"
    Console().print(table)
