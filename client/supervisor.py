"""Keeping a site's Flower processes up: restart with backoff, a status file, one JSON log line per event.

Hospital IT starts ``fedfusion site start`` once (systemd, a container) and looks at it again only when
something is wrong. Flower's SuperNode already retries an unreachable coordinator on its own, but it
*exits* when the coordinator refuses it (e.g. its key is not registered yet) or when it crashes; the
supervisor restarts it after 2, 4, 8 … s (at most ``max_backoff_s``), resetting the delay once a run
of the processes has stayed up for a minute. A configuration error (exit code 2) is not retried: it
needs a person. ``SIGTERM``/``SIGINT`` stop everything in order.

The status file (JSON, replaced atomically) is what a monitoring agent or the site dashboard reads:
``state`` is one of ``starting``, ``running``, ``restarting``, ``stopped``, ``failed``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_CONFIG_ERROR = 2
STABLE_AFTER_S = 60.0


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def log_event(event: str, **fields: Any) -> None:
    """One JSON object per line on stderr: what journald, docker logs and log shippers expect."""
    print(json.dumps({"time": now_iso(), "component": "fedfusion-site", "event": event, **fields},
                     default=str), file=sys.stderr, flush=True)


def write_status(path: Path, status: Mapping[str, Any]) -> None:
    """Replace the status file atomically so a reader never sees half a JSON document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**status, "updated": now_iso()}, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_status(path: Path) -> dict[str, Any] | None:
    """The last status written, or None when the site has never been started with this file."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _stop(procs: Sequence[subprocess.Popen], timeout: float = 15) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def supervise(site_id: str, supernode_command: Sequence[str],
              helper_commands: Callable[[int], list[list[str]]], status_path: Path, *,
              env: Mapping[str, str] | None = None, initial_backoff_s: float = 2.0, max_backoff_s: float = 300.0,
              max_restarts: int | None = None) -> int:
    """Run the SuperNode (+ helpers that need its pid) until stopped; restart it when it exits.

    Returns the exit code to leave with: 0 after SIGTERM/SIGINT, the SuperNode's code when it was a
    configuration error or ``max_restarts`` was reached.
    """
    stopping = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    status: dict[str, Any] = {"site": site_id, "state": "starting", "restarts": 0, "supervisor_pid": os.getpid()}
    write_status(status_path, status)
    backoff = initial_backoff_s
    try:
        while True:
            started = time.monotonic()
            supernode = subprocess.Popen(list(supernode_command), env=dict(env) if env else None)
            helpers = [subprocess.Popen(cmd, env=dict(env) if env else None)
                       for cmd in helper_commands(supernode.pid)]
            status.update(state="running", supernode_pid=supernode.pid, helper_pids=[p.pid for p in helpers],
                          started=now_iso())
            write_status(status_path, status)
            log_event("started", site=site_id, supernode_pid=supernode.pid, restarts=status["restarts"])
            while supernode.poll() is None and not stopping.is_set():
                stopping.wait(0.5)
            _stop([supernode, *helpers])
            code = supernode.returncode
            if stopping.is_set():
                status.update(state="stopped", last_exit_code=code)
                write_status(status_path, status)
                log_event("stopped", site=site_id)
                return 0
            status["last_exit_code"] = code
            if code == EXIT_CONFIG_ERROR or (max_restarts is not None and status["restarts"] >= max_restarts):
                status.update(state="failed", message="configuration error: fix site.toml or the kit, then restart"
                              if code == EXIT_CONFIG_ERROR else f"gave up after {status['restarts']} restarts")
                write_status(status_path, status)
                log_event("failed", site=site_id, exit_code=code, message=status["message"])
                return code
            if time.monotonic() - started >= STABLE_AFTER_S:
                backoff = initial_backoff_s
            status.update(state="restarting", restarts=status["restarts"] + 1, retry_in_s=backoff)
            write_status(status_path, status)
            log_event("supernode exited; restarting", site=site_id, exit_code=code, retry_in_s=backoff,
                      restarts=status["restarts"])
            if stopping.wait(backoff):
                status.update(state="stopped")
                write_status(status_path, status)
                log_event("stopped", site=site_id)
                return 0
            backoff = min(max_backoff_s, backoff * 2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
