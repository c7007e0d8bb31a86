"""What a finished run's status means for ``fedfusion run``'s exit code.

``flwr run --stream`` exits 0 whether the ServerApp completed, raised (e.g. secure aggregation
asked of two sites) or was stopped: it only reports that the logs ended. The SuperLink knows better:
``flwr ls --run-id N --format json`` holds ``finished:completed``, ``finished:failed`` (with the
exception in ``status-details``) or ``finished:stopped``. This module reads that answer and turns it
into an exit code and one line a coordinator can act on.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

COMPLETED = "finished:completed"
EXIT_OK = 0
EXIT_RUN_FAILED = 1


@dataclass(frozen=True)
class RunOutcome:
    """A run's status on the SuperLink and the exit code ``fedfusion run`` returns for it."""

    run_id: int
    status: str
    details: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.status == COMPLETED else EXIT_RUN_FAILED

    def message(self) -> str:
        """One line: what happened to the run and where to look."""
        if self.status == COMPLETED:
            return f"run {self.run_id} finished: completed"
        why = f": {self.details}" if self.details else ""
        if self.status == "finished:failed":
            return (f"run {self.run_id} FAILED{why} (the run folder's report, if written, says which round; "
                    f"`fedfusion status` lists it as {self.status})")
        if self.status == "finished:stopped":
            return f"run {self.run_id} was stopped before it finished{why}; `fedfusion run --resume` goes on"
        return f"run {self.run_id} did not finish (status {self.status or 'unknown'}){why}"


def started_run_id(stdout: str) -> int | None:
    """The run id from ``flwr run --format json`` (``{"success": true, "run-id": "7", ...}``)."""
    start = stdout.find("{")
    try:
        reply = json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return None
    run_id = reply.get("run-id") if reply.get("success") else None
    return int(run_id) if run_id not in (None, "") else None


def start_failure(stdout: str, stderr: str) -> str:
    """Why ``flwr run --format json`` started nothing: its ``error-message``, else its last line."""
    start = stdout.find("{")
    try:
        reply = json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    message = str(reply.get("error-message") or "").strip() or (stdout + stderr).strip()
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "no answer from flwr"


def parse_run_status(stdout: str, run_id: int) -> tuple[str, str] | None:
    """(status, details) of one run from ``flwr ls --run-id N --format json``; None if it is not listed."""
    start = stdout.find("{")
    try:
        reply = json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return None
    for run in reply.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "")), str(run.get("status-details", "") or "")
    return None


def wait_for_outcome(list_run: Callable[[int], str], run_id: int, *, timeout: float = 60.0,
                     poll: float = 1.0) -> RunOutcome:
    """Poll ``list_run(run_id)`` (stdout of ``flwr ls --run-id``) until the run is finished.

    The log stream ends when the ServerApp process exits, a moment before the SuperLink records the
    final status, so a single look could read ``running``.
    """
    deadline = time.monotonic() + timeout
    status, details = "", ""
    while True:
        found = parse_run_status(list_run(run_id), run_id)
        if found is not None:
            status, details = found
            if status.startswith("finished"):
                return RunOutcome(run_id, status, details)
        if time.monotonic() >= deadline:
            return RunOutcome(run_id, status, details or "the SuperLink did not report the run as finished")
        time.sleep(poll)


def flwr_list_run(flwr: str, connection: str, env: Mapping[str, str]) -> Callable[[int], str]:
    """A ``list_run`` for :func:`wait_for_outcome` that asks the SuperLink through the ``flwr`` CLI."""
    def list_run(run_id: int) -> str:
        done: Any = subprocess.run([flwr, "ls", connection, "--run-id", str(run_id), "--format", "json"],
                                   capture_output=True, text=True, env=dict(env), timeout=60)
        return str(done.stdout)
    return list_run
