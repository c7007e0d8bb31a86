"""One writer per run folder: a ServerApp holds an exclusive ``flock`` on ``<run>/.writer.lock``.

Why: when a coordinator crashes, Flower's SuperExec and then the ServerApp notice their parent is gone
and exit, but that chain takes seconds (longer on a loaded host), and a ServerApp stuck in a retry
loop may reconnect to a SuperLink restarted on the same address. A resumed run must never share the
run folder (checkpoints, metrics, replies.jsonl) with an orphan of the crashed one. The kernel drops
the lock when its holder dies, however it dies, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedfusion.common.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILENAME = ".writer.lock"
#: How long a new ServerApp waits for the previous one to go away before refusing.
DEFAULT_WAIT_S = 120.0


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def hold_run_folder(run_dir: Path, wait_s: float = DEFAULT_WAIT_S, poll_s: float = 0.5) -> Iterator[Path]:
    """Hold ``run_dir``'s writer lock for the ``with`` block; refuse if another process keeps it ``wait_s``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILENAME
    handle = path.open("a+")
    try:
        deadline = time.monotonic() + wait_s
        warned = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"{run_dir}: another ServerApp ({_holder(path)}) still writes this run folder after "
                        f"{wait_s:.0f} s; stop it (or wait for it to exit) and resume again") from None
                if not warned:
                    log.warning("%s is held by %s (an earlier ServerApp still exiting?); waiting up to %.0f s",
                                run_dir, _holder(path), wait_s)
                    warned = True
                time.sleep(poll_s)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        yield path
    finally:
        handle.close()  # closing the descriptor releases the lock
