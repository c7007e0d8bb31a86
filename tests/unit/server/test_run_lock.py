"""One writer per run folder: a resumed ServerApp waits for an orphan of a crashed coordinator to die,
refuses if it does not, and a holder killed with SIGKILL leaves no stale lock behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedfusion.common.config import ConfigError
from fedfusion.server.run_lock import LOCK_FILENAME, hold_run_folder

HOLD = """
import sys, time
from pathlib import Path
from fedfusion.server.run_lock import hold_run_folder
with hold_run_folder(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _orphan(run_dir: Path) -> subprocess.Popen:
    """A process that holds the run folder, as a ServerApp of a crashed coordinator would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path: Path) -> None:
    orphan = _orphan(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(ConfigError, match=rf"another ServerApp \(pid {orphan.pid} .*\) still writes"):
            with hold_run_folder(tmp_path, wait_s=1.0, poll_s=0.1):
                pytest.fail("the lock was granted twice")
        assert time.monotonic() - start >= 1.0  # it waited before refusing
    finally:
        orphan.kill()
        orphan.wait()


def test_the_resumed_writer_goes_on_once_the_orphan_is_killed(tmp_path: Path) -> None:
    orphan = _orphan(tmp_path)
    threading.Timer(0.5, orphan.send_signal, (signal.SIGKILL,)).start()  # no clean-up code runs
    with hold_run_folder(tmp_path, wait_s=30.0, poll_s=0.05) as lock:
        assert orphan.poll() is not None  # it could only start after the holder died
        assert (tmp_path / LOCK_FILENAME) == lock and lock.read_text().startswith("pid ")
    orphan.wait()
    with hold_run_folder(tmp_path, wait_s=0.0):  # released at the end of the block
        pass
