"""Coordinator operations around Flower's own runtime: start the SuperLink, launch runs, list them.

fedfusion writes no networking of its own: ``coordinator start`` runs ``flower-superlink`` with a
persistent ``--database`` and with runtime dependency installation disabled (by default the
SuperLink would ``uv sync`` the app's dependencies for every run, pulling gigabytes of CUDA
wheels); ``run`` and ``status`` call the ``flwr`` CLI against a connection we write into a
coordinator-local ``FLWR_HOME`` so the user's own ``~/.flwr`` is never touched.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfusion.common.flower_tools import executable, tool_env

CONNECTION = "fedfusion"


@dataclass(frozen=True)
class CoordinatorPaths:
    """Where a coordinator keeps its state: the SuperLink database and the flwr CLI home."""

    state_dir: Path

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr"


def write_connection(paths: CoordinatorPaths, address: str, *, insecure: bool,
                     root_certificates: str | None = None) -> Path:
    """The flwr CLI connection named ``fedfusion`` (Flower 1.41 keeps them in FLWR_HOME/config.toml)."""
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    if root_certificates:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    path = paths.flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def superlink_command(paths: CoordinatorPaths, host: str, port: int, *, insecure: bool,
                      certificates: tuple[str, str, str] | None = None) -> list[str]:
    """``flower-superlink`` serving Fleet, Control and Runtime APIs on one host:port."""
    cmd = [executable("flower-superlink"), "--host", host, "--port", str(port), "--database", str(paths.database),
           "--disable-runtime-dependency-installation"]
    if insecure:
        cmd.append("--insecure")
    elif certificates is not None:
        ca, cert, key = certificates
        cmd += ["--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key]
    else:
        raise ValueError("TLS needs --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile; use --insecure only for "
                         "local development")
    return cmd


def start_coordinator(state_dir: Path, host: str, port: int, *, insecure: bool,
                      certificates: tuple[str, str, str] | None = None) -> int:
    """Run the SuperLink in the foreground until it exits or is interrupted; return its exit code."""
    paths = CoordinatorPaths(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(paths, host, port, insecure=insecure, certificates=certificates)
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    write_connection(paths, f"{client_host}:{port}", insecure=insecure,
                     root_certificates=certificates[0] if certificates else None)
    if insecure:
        print("WARNING: --insecure: traffic between sites and the coordinator is NOT encrypted. "
              "Use it only for local development.", file=sys.stderr)
    try:
        return subprocess.call(cmd, env=tool_env())
    except KeyboardInterrupt:
        return 130


def toml_value(value: Any) -> str:
    """A run-config value as the TOML literal ``flwr run --run-config`` expects."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def default_app_dir() -> Path:
    """The fedfusion project folder (holding pyproject.toml with the Flower app), for ``flwr run``."""
    import fedfusion

    root = Path(fedfusion.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError("cannot find fedfusion's pyproject.toml next to the installed package; "
                                "pass --app-dir with the fedfusion source folder (install with pip install -e .)")
    return root


def launch_run(state_dir: Path, run_config: Mapping[str, Any], *, app_dir: Path | None = None,
               stream: bool = True) -> int:
    """``flwr run APP fedfusion --run-config ...``; with ``stream`` it waits and shows the log."""
    paths = CoordinatorPaths(state_dir)
    if not (paths.flwr_home / "config.toml").is_file():
        raise FileNotFoundError(f"{state_dir} holds no coordinator connection; run 'fedfusion coordinator start' "
                                "with this --state-dir first")
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    cmd = [executable("flwr"), "run", str(app_dir or default_app_dir()), CONNECTION]
    if overrides:
        cmd += ["--run-config", overrides]
    if stream:
        cmd.append("--stream")
    return subprocess.call(cmd, env=tool_env({"FLWR_HOME": str(paths.flwr_home)}))


def run_status(state_dir: Path) -> int:
    """``flwr ls``: the runs the SuperLink knows, with their status."""
    paths = CoordinatorPaths(state_dir)
    return subprocess.call([executable("flwr"), "ls", CONNECTION],
                           env=tool_env({"FLWR_HOME": str(paths.flwr_home)}))
