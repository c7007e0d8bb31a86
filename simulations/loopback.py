"""A real deployment on one machine: ``fedfusion coordinator start`` plus one ``fedfusion site
start`` per site, all on 127.0.0.1, driven through the same commands a coordinator and hospital IT
use. For integration tests and the deployment-overhead benchmark; every process runs in its own
process group and is killed on exit, also when the caller fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

FEDFUSION = str(Path(sys.executable).parent / "fedfusion")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class LoopbackDeployment:
    """``with LoopbackDeployment(folder, schema, {site: manifest}) as dep: dep.run(rounds=2)``."""

    def __init__(self, folder: Path, schema: Path, site_manifests: Mapping[str, Path], device: str = "cpu"):
        self.folder = folder
        self.schema = schema
        self.site_manifests = dict(site_manifests)
        self.device = device
        self.port = free_port()
        self.state_dir = folder / "coordinator"
        self._procs: list[subprocess.Popen] = []

    def _start(self, name: str, args: list[str]) -> None:
        log = (self.folder / f"{name}.log").open("w")
        self._procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self) -> LoopbackDeployment:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._start("coordinator", [FEDFUSION, "coordinator", "start", "--state-dir", str(self.state_dir),
                                        "--port", str(self.port), "--insecure"])
            wait_for_port(self.port)
            for site, manifest in self.site_manifests.items():
                config = self.folder / f"{site}.toml"
                config.write_text(
                    f'[site]\nid = "{site}"\nmanifest = "{manifest}"\nschema = "{self.schema}"\n'
                    f'device = "{self.device}"\n[coordinator]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
                    f"[supernode]\nport = {free_port()}\n")
                self._start(f"site-{site}", [FEDFUSION, "site", "start", str(config)])
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, run_dir: Path, rounds: int, settings: Mapping[str, Any] | None = None,
            timeout: float = 1800) -> subprocess.CompletedProcess:
        """``fedfusion run`` with every site required; returns the finished process (check returncode)."""
        extra: Sequence[str] = [arg for k, v in (settings or {}).items() for arg in ("--set", f"{k}={v}")]
        return subprocess.run([FEDFUSION, "run", "--state-dir", str(self.state_dir), "--schema", str(self.schema),
                               "--run-dir", str(run_dir), "--rounds", str(rounds),
                               "--min-sites", str(len(self.site_manifests)), *extra],
                              capture_output=True, text=True, timeout=timeout)

    def logs(self, tail: int = 2000) -> dict[str, str]:
        return {p.name: p.read_text()[-tail:] for p in self.folder.glob("*.log")}

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
