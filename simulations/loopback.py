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
from collections.abc import Callable, Mapping, Sequence
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
                 warm: bool = True, secure: bool = True, approved_apps: Sequence[str] | None = None,
                 host: str = "127.0.0.1", bind: str = "127.0.0.1",
                 prefix: Callable[[str], Sequence[str]] | None = None, site_extra: str = ""):
        """``host``: the address sites connect to (and the kit's certificate names); ``bind``: the
        coordinator's ``--host``; ``prefix(name)``: a command prefix for process ``name``
        ("coordinator", "site-ID", "run", "tool"), e.g. ``["ip", "netns", "exec", NS]`` to run it on
        another (namespaced) host; ``site_extra``: TOML appended to every site.toml (``{site}`` is
        replaced by the site id). With a prefix, nothing is checked from this host's network: the
        coordinator is ready once it logged its site registrations (``secure`` only)."""
        self.host, self.bind, self.prefix, self.site_extra = host, bind, prefix, site_extra
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
        self.coordinator: subprocess.Popen | None = None

    def _prefixed(self, name: str, args: Sequence[str]) -> list[str]:
        return [*(self.prefix(name) if self.prefix else ()), *args]

    def _start(self, name: str, args: list[str]) -> None:
        log = (self.folder / f"{name}.log").open("w")
        self._procs.append(subprocess.Popen(self._prefixed(name.split(".")[0], args), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True))

    def start_coordinator(self, log_name: str = "coordinator") -> subprocess.Popen:
        """``fedfusion coordinator start`` on ``self.state_dir`` (again, after a stop: same database);
        returns once it listens (and, secured, registered every site key); log in LOG_NAME.log."""
        transport = ["--kit", str(self.kits / "coordinator")] if self.secure else ["--insecure"]
        self._start(log_name, [FEDFUSION, "coordinator", "start", "--state-dir", str(self.state_dir),
                               "--host", self.bind, "--port", str(self.port), *transport])
        self.coordinator = self._procs[-1]
        if self.prefix is None:
            wait_for_port(self.port)
        if self.secure:  # a site connecting before its key is registered would be refused
            self._wait_for_log(log_name, [f"site {s}: " for s in self.site_manifests])
        return self.coordinator

    def __enter__(self) -> LoopbackDeployment:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            if self.secure:
                from fedfusion.server.provision import provision

                provision(self.kits, list(self.site_manifests), [self.host], port=self.port)
            self.start_coordinator()
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
                    auth: bool = True, warm: bool | None = None, max_restarts: int | None = None,
                    approved_apps: Sequence[str] | None = None) -> Path:
        """A site.toml for ``site``: insecure, or with ``kit``'s CA (``ca`` overrides it) and, with
        ``auth``, its key; ``approved_apps`` replaces the deployment's allow-list for this site."""
        approved = self.approved_apps if approved_apps is None else approved_apps
        transport = "insecure = true\n"
        if self.secure:
            kit = kit or self.kits / site
            transport = f'root-certificates = "{ca or kit / "ca.pem"}"\n'
            if auth:
                transport += f'[auth]\nprivate-key = "{kit / "site.key"}"\npublic-key = "{kit / "site.pub"}"\n'
                if (kit / "roster.json").is_file():  # secure rounds: the only peers this site trusts
                    transport += f'[federation]\nroster = "{kit / "roster.json"}"\n'
        config = self.folder / f"{site}.toml"
        config.write_text(
            f'[site]\nid = "{site}"\nmanifest = "{manifest}"\nschema = "{self.schema}"\ndevice = "{self.device}"\n'
            f'[coordinator]\naddress = "{self.host}:{self.port}"\n{transport}'
            f"[supernode]\nport = {free_port()}\nwarm = {str(self.warm if warm is None else warm).lower()}\n"
            + ("" if max_restarts is None else f"max-restarts = {max_restarts}\n")
            + ("" if approved is None or warm is False else
               "[approval]\napps = [" + ", ".join(f'"{h}"' for h in approved) + "]\n")
            + self.site_extra.replace("{site}", site))
        return config

    def start_site(self, site: str, manifest: Path, **config: Any) -> subprocess.Popen:
        """``fedfusion site start`` for one more site (``config``: see ``site_config``); log in SITE.log."""
        self._start(f"site-{site}", [FEDFUSION, "site", "start", str(self.site_config(site, manifest, **config))])
        self.sites[site] = self._procs[-1]
        return self.sites[site]

    def run_command(self, run_dir: Path, rounds: int, settings: Mapping[str, Any] | None = None,
                    min_sites: int | None = None, resume: bool = False) -> list[str]:
        """The ``fedfusion run`` command line (with ``prefix("run")``); ``min_sites``: default every site."""
        extra: Sequence[str] = [arg for k, v in (settings or {}).items() for arg in ("--set", f"{k}={v}")]
        return self._prefixed("run", [
            FEDFUSION, "run", "--state-dir", str(self.state_dir), "--schema", str(self.schema), "--run-dir",
            str(run_dir), "--rounds", str(rounds),
            "--min-sites", str(len(self.site_manifests) if min_sites is None else min_sites),
            *(["--resume"] if resume else []), *extra])

    def run(self, run_dir: Path, rounds: int, settings: Mapping[str, Any] | None = None,
            timeout: float = 1800, min_sites: int | None = None, resume: bool = False) -> subprocess.CompletedProcess:
        """``fedfusion run`` with every site required; returns the finished process (check returncode)."""
        return subprocess.run(self.run_command(run_dir, rounds, settings, min_sites, resume),
                              capture_output=True, text=True, timeout=timeout)

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        """Signal ``proc``'s whole process group (a crash with SIGKILL) and reap it."""
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        return proc.wait(timeout=timeout)

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
