"""The site supervisor: restarts a SuperNode that exits, never retries a config error, stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedfusion.client.supervisor import read_status, supervise


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_an_exiting_supernode_is_restarted_until_the_limit(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    status = tmp_path / "state" / "site-status.json"
    code = supervise("A", _python(f"open({str(runs)!r}, 'a').write('x'); raise SystemExit(1)"), lambda pid: [],
                     status, initial_backoff_s=0.05, max_restarts=3)
    assert code == 1
    assert runs.read_text() == "xxxx"  # first start + 3 restarts
    final = read_status(status)
    assert final is not None and final["state"] == "failed" and final["restarts"] == 3
    assert final["last_exit_code"] == 1 and "gave up" in final["message"]
    events = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines()
              if line.startswith("{")]
    assert events.count("started") == 4 and events[-1] == "failed"


def test_a_configuration_error_is_not_retried(tmp_path: Path) -> None:
    status = tmp_path / "site-status.json"
    assert supervise("A", _python("raise SystemExit(2)"), lambda pid: [], status, initial_backoff_s=0.01) == 2
    final = read_status(status)
    assert final is not None and final["state"] == "failed" and final["restarts"] == 0
    assert "configuration error" in final["message"]


def test_helpers_get_the_supernode_pid_and_stop_with_it(tmp_path: Path) -> None:
    seen = tmp_path / "helper"
    status = tmp_path / "site-status.json"
    helper = _python(f"import sys, time; open({str(seen)!r}, 'w').write(sys.argv[1]); time.sleep(60)")
    began = time.monotonic()
    supervise("A", _python("import time; time.sleep(1.5)"), lambda pid: [[*helper, str(pid)]], status,
              max_restarts=0)
    assert time.monotonic() - began < 20  # the sleeping helper was stopped, not waited for
    final = read_status(status)
    assert final is not None and seen.read_text() == str(final["supernode_pid"])


def test_sigterm_stops_the_site_cleanly(tmp_path: Path) -> None:
    status = tmp_path / "site-status.json"
    probe = (
        "import sys; from pathlib import Path; from fedfusion.client.supervisor import supervise; "
        f"sys.exit(supervise('A', [sys.executable, '-c', 'import time; time.sleep(60)'], lambda pid: [], "
        f"Path({str(status)!r})))"
    )
    proc = subprocess.Popen([sys.executable, "-c", probe])
    deadline = time.monotonic() + 60
    while (read_status(status) or {}).get("state") != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    supernode_pid = read_status(status)["supernode_pid"]  # type: ignore[index]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert read_status(status)["state"] == "stopped"  # type: ignore[index]
    try:
        os.kill(supernode_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
