"""A real deployment on one machine: ``fedfusion coordinator start`` plus one ``fedfusion site
start`` per site, all on 127.0.0.1, driven through the same commands a coordinator and hospital IT
use. For integration tests and the deployment-overhead benchmark; every process runs in its own
process group and is killed on exit, also when the caller fails.

``secure=True`` (the default) deploys as a federation should run: ``fedfusion provision`` writes a
kit for every site into the folder, the coordinator starts with ``--kit`` (TLS + SuperNode
authentication, site keys registered at start) and each site uses its kit's CA and key.
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

    def __init__(self, folder: Path, schema: Path, site_manifests: Mapping[str, Path], device: str = "cpu",
                 warm: bool = True, secure: bool = True, approved_apps: Sequence[str] | None = None):
        self.folder = folder
        self.approved_apps = approved_apps  # None: no [approval] table at the sites
        self.warm = warm
        self.secure = secure
        self.kits = folder / "kits"
        self.schema = schema
        self.site_manifests = dict(site_manifests)
        self.device = device
        self.port = free_port()
        self.state_dir = folder / "coordinator"
        self._procs: list[subprocess.Popen] = []
        self.sites: dict[str, subprocess.Popen] = {}  # site id -> its `fedfusion site start` process

    def _start(self, name: str, args: list[str]) -> None:
        log = (self.folder / f"{name}.log").open("w")
        self._procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self) -> LoopbackDeployment:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            transport = ["--insecure"]
            if self.secure:
                from fedfusion.server.provision import provision

                provision(self.kits, list(self.site_manifests), ["127.0.0.1"], port=self.port)
                transport = ["--kit", str(self.kits / "coordinator")]
            self._start("coordinator", [FEDFUSION, "coordinator", "start", "--state-dir", str(self.state_dir),
                                        "--port", str(self.port), *transport])
            wait_for_port(self.port)
            if self.secure:  # a site connecting before its key is registered would be refused
                self._wait_for_log("coordinator", [f"site {s}: " for s in self.site_manifests])
            for site, manifest in self.site_manifests.items():
                self.start_site(site, manifest)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_log(self, name: str, needles: Sequence[str], timeout: float = 120.0) -> None:
        log, deadline = self.folder / f"{name}.log", time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text() if log.is_file() else ""
            if all(needle in text for needle in needles):
                return
            if any(line.startswith("error: ") for line in text.splitlines()):
                raise RuntimeError(f"{name} failed to start:\n{text[-3000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"{name} did not log {needles} within {timeout} s")

    def site_config(self, site: str, manifest: Path, *, kit: Path | None = None, ca: Path | None = None,
                    auth: bool = True, warm: bool | None = None, max_restarts: int | None = None) -> Path:
        """A site.toml for ``site``: insecure, or with ``kit``'s CA (``ca`` overrides it) and, with
        ``auth``, its key."""
        transport = "insecure = true\n"
        if self.secure:
            kit = kit or self.kits / site
            transport = f'root-certificates = "{ca or kit / "ca.pem"}"\n'
            if auth:
                transport += f'[auth]\nprivate-key = "{kit / "site.key"}"\npublic-key = "{kit / "site.pub"}"\n'
        config = self.folder / f"{site}.toml"
        config.write_text(
            f'[site]\nid = "{site}"\nmanifest = "{manifest}"\nschema = "{self.schema}"\ndevice = "{self.device}"\n'
            f'[coordinator]\naddress = "127.0.0.1:{self.port}"\n{transport}'
            f"[supernode]\nport = {free_port()}\nwarm = {str(self.warm if warm is None else warm).lower()}\n"
            + ("" if max_restarts is None else f"max-restarts = {max_restarts}\n")
            + ("" if self.approved_apps is None or warm is False else
               "[approval]\napps = [" + ", ".join(f'"{h}"' for h in self.approved_apps) + "]\n"))
        return config

    def start_site(self, site: str, manifest: Path, **config: Any) -> subprocess.Popen:
        """``fedfusion site start`` for one more site (``config``: see ``site_config``); log in SITE.log."""
        self._start(f"site-{site}", [FEDFUSION, "site", "start", str(self.site_config(site, manifest, **config))])
        self.sites[site] = self._procs[-1]
        return self.sites[site]

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
