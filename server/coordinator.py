"""Coordinator operations around Flower's own runtime: start the SuperLink, launch runs, list them.

fedfusion writes no networking of its own: ``coordinator start`` runs ``flower-superlink`` with a
persistent ``--database`` and with runtime dependency installation disabled (by default the
SuperLink would ``uv sync`` the app's dependencies for every run, pulling gigabytes of CUDA
wheels); ``run`` and ``status`` call the ``flwr`` CLI against a connection we write into a
coordinator-local ``FLWR_HOME`` so the user's own ``~/.flwr`` is never touched.

Transport security is Flower's too (see ``server/provision.py`` for the kit that feeds it): TLS with
the provisioned certificate, and SuperNode authentication (``--enable-supernode-auth``). In Flower
1.41 a SuperLink with node authentication accepts only SuperNodes whose public key was registered
through its Control API (``flwr supernode register KEY.pub``; the ``--auth-list-public-keys`` CSV of
older releases is refused at start), so ``coordinator start`` registers the kit's site keys itself
once the SuperLink listens, and ``coordinator register-sites`` adds keys to a running one.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfusion.common.flower_tools import executable, tool_env
from fedfusion.common.roster import ROSTER_FILENAME

CONNECTION = "fedfusion"
KIT_FILES = ("ca.pem", "server.pem", "server.key")
# flwr/supercore/error/base.py: ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE; `flwr supernode register`
# reports it as "[code: 23] Public key already in use." (exit status 0, "success": false in JSON).
_ALREADY_REGISTERED = ("[code: 23]", "already in use")
_INSECURE_WARNING = ("WARNING: --insecure: traffic between sites and the coordinator is NOT encrypted and sites are "
                     "NOT authenticated: anyone who reaches this port can join and read the model. "
                     "Use it only for local development, never with patient data.")
_NO_NODE_AUTH_WARNING = ("WARNING: --no-node-auth: TLS is on, but any SuperNode that reaches this port can join the "
                         "federation. Use it only for rehearsals with sites that have no key yet.")


class CoordinatorError(RuntimeError):
    """The coordinator cannot start or register sites; the message says what to fix."""


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


def kit_certificates(kit: Path) -> tuple[str, str, str]:
    """(CA, certificate, key) of a coordinator kit written by ``fedfusion provision``."""
    files = [kit / name for name in KIT_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CoordinatorError(f"--kit {kit}: missing {', '.join(missing)}; pass the 'coordinator' folder that "
                               "'fedfusion provision' wrote (or give --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile)")
    ca, cert, key = (str(f.resolve()) for f in files)
    return ca, cert, key


def resolve_certificates(*, insecure: bool, kit: Path | None = None, ca: str | None = None, cert: str | None = None,
                         key: str | None = None) -> tuple[str, str, str] | None:
    """TLS files from ``--kit`` and/or the three ``--ssl-*`` flags (a flag wins over the kit's file);
    ``None`` only with ``--insecure``."""
    if insecure:
        if kit is not None or ca or cert or key:
            raise CoordinatorError("--insecure turns TLS off: do not combine it with --kit or --ssl-* options")
        return None
    from_kit = kit_certificates(kit) if kit is not None else (None, None, None)
    chosen = (ca or from_kit[0], cert or from_kit[1], key or from_kit[2])
    if not all(chosen):
        raise CoordinatorError("TLS needs --kit DIR (from 'fedfusion provision') or all of --ssl-ca-certfile, "
                               "--ssl-certfile and --ssl-keyfile; use --insecure only for local development")
    for path in chosen:
        if not Path(str(path)).is_file():
            raise CoordinatorError(f"TLS file not found: {path}")
    return str(chosen[0]), str(chosen[1]), str(chosen[2])


def superlink_command(paths: CoordinatorPaths, host: str, port: int, *, insecure: bool,
                      certificates: tuple[str, str, str] | None = None, node_auth: bool = True) -> list[str]:
    """``flower-superlink`` serving Fleet, Control and Runtime APIs on one host:port.

    With TLS, ``node_auth`` (the default) adds ``--enable-supernode-auth``: only SuperNodes whose
    registered key signs their requests may connect. Flower refuses node auth without TLS, so
    ``--insecure`` never has it.
    """
    cmd = [executable("flower-superlink"), "--host", host, "--port", str(port), "--database", str(paths.database),
           "--disable-runtime-dependency-installation"]
    if insecure:
        cmd.append("--insecure")
        return cmd
    if certificates is None:
        raise ValueError("TLS needs --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile; use --insecure only for "
                         "local development")
    ca, cert, key = certificates
    cmd += ["--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def register_command(key_file: Path, site_id: str) -> list[str]:
    """``flwr supernode register`` of one site key against the coordinator's connection."""
    return [executable("flwr"), "supernode", "register", str(key_file), CONNECTION, "--name", site_id,
            "--format", "json"]


def _register_outcome(stdout: str) -> tuple[bool, str]:
    """(done, detail) from ``flwr supernode register --format json``: registered now or before is done."""
    start = stdout.find("{")
    try:
        reply = json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if reply.get("success"):
        return True, f"registered as node {reply.get('node-id')}"
    message = str(reply.get("error-message") or stdout.strip() or "no answer from flwr")
    if any(marker in message for marker in _ALREADY_REGISTERED):
        return True, "already registered"
    return False, message.splitlines()[-1] if message.strip() else message


def register_sites(state_dir: Path, keys: Mapping[str, Path], *, timeout: float = 60.0,
                   out: Any = None) -> dict[str, str]:
    """Register each site's public key with the running SuperLink (idempotent: a key registered
    before counts as done). Retries while the Control API is still starting; raises
    ``CoordinatorError`` naming the site and Flower's reason otherwise."""
    from fedfusion.server.provision import load_site_public_key

    out = out or sys.stderr
    paths = CoordinatorPaths(state_dir)
    if not (paths.flwr_home / "config.toml").is_file():
        raise CoordinatorError(f"{state_dir} holds no coordinator connection; start the coordinator with this "
                               "--state-dir first ('fedfusion coordinator start')")
    env = tool_env({"FLWR_HOME": str(paths.flwr_home)})
    results: dict[str, str] = {}
    for site_id, key_file in keys.items():
        load_site_public_key(key_file)  # a wrong file fails here with a clear message, not inside flwr
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(register_command(key_file, site_id), env=env, capture_output=True, text=True,
                                  timeout=max(timeout, 30))
            ok, detail = _register_outcome(done.stdout)
            if ok:
                results[site_id] = detail
                print(f"site {site_id}: {detail}", file=out)
                break
            if time.monotonic() > deadline:
                raise CoordinatorError(f"could not register site {site_id} ({key_file}): {detail}. Check that the "
                                       "SuperLink runs with TLS and that its certificate names 127.0.0.1")
            time.sleep(1.0)
    return results


def _wait_until_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CoordinatorError(f"flower-superlink exited with code {proc.returncode} before it listened; "
                                   "see its messages above")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise CoordinatorError(f"the SuperLink did not listen on {host}:{port} within {timeout:.0f} s")


def _loopback(host: str) -> str:
    """The address the coordinator's own tools use for a SuperLink bound to ``host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def adopt_kit_roster(kit: Path, state_dir: Path) -> Path | None:
    """Copy the coordinator kit's ``roster.json`` into the state folder, where ``fedfusion run`` finds it.

    Why: with a roster in the run config the ServerApp accepts a reply only when it is signed by the
    roster site it names (server/reply_attribution.py); keeping it in the state folder makes that the
    default for every run on this coordinator instead of a flag people forget.
    """
    source = kit / ROSTER_FILENAME
    if not source.is_file():
        return None
    state_dir.mkdir(parents=True, exist_ok=True)
    target = state_dir / ROSTER_FILENAME
    shutil.copyfile(source, target)
    return target


def state_roster(state_dir: Path) -> Path | None:
    """The roster a run on this coordinator verifies replies against (None: replies are not attributed)."""
    path = state_dir / ROSTER_FILENAME
    return path.resolve() if path.is_file() else None


def start_coordinator(state_dir: Path, host: str, port: int, *, insecure: bool,
                      certificates: tuple[str, str, str] | None = None, node_auth: bool = True,
                      site_keys: Mapping[str, Path] | None = None) -> int:
    """Run the SuperLink in the foreground until it exits or is stopped; return its exit code.

    With node authentication, ``site_keys`` are registered as soon as the SuperLink listens; if one
    cannot be registered the SuperLink is stopped again (exit 2), because a coordinator that sites
    cannot join would otherwise look healthy.
    """
    from fedfusion.common.flower_adapter import UnverifiedFlowerError, check_flower_version

    try:
        check_flower_version("fedfusion coordinator start")
    except UnverifiedFlowerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if insecure:
        node_auth = False
    paths = CoordinatorPaths(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(paths, host, port, insecure=insecure, certificates=certificates, node_auth=node_auth)
    client_host = _loopback(host)
    client_address = f"[{client_host}]:{port}" if ":" in client_host else f"{client_host}:{port}"
    write_connection(paths, client_address, insecure=insecure,
                     root_certificates=certificates[0] if certificates else None)
    if insecure:
        print(_INSECURE_WARNING, file=sys.stderr)
    elif not node_auth:
        print(_NO_NODE_AUTH_WARNING, file=sys.stderr)
    elif not site_keys:
        print(f"node authentication is on and no site keys were given: register them with 'fedfusion coordinator "
              f"register-sites KIT_OR_KEYS --state-dir {state_dir}'", file=sys.stderr)
    # systemd and container runtimes stop services with SIGTERM: exit through `finally` so the
    # SuperLink (and the ServerApp processes it started) stop with us.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    proc = subprocess.Popen(cmd, env=tool_env())
    try:
        if node_auth and site_keys:
            try:
                _wait_until_listening(client_host, port, proc)
                register_sites(state_dir, site_keys)
            except CoordinatorError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


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


def existing_state(state_dir: Path) -> CoordinatorPaths:
    """The coordinator's paths, once its ``coordinator start`` wrote the flwr connection.

    Checked before any ``flwr`` call: pointed at a folder without one, the flwr CLI would create a
    default ``config.toml`` there (a file in the user's working directory) and print its own error box.
    """
    paths = CoordinatorPaths(state_dir)
    if not (paths.flwr_home / "config.toml").is_file():
        shown = state_dir if state_dir.is_absolute() or str(state_dir).startswith(".") else f"./{state_dir}"
        raise CoordinatorError(f"no coordinator state in {shown}: start one with `fedfusion coordinator start` "
                               "(or pass the --state-dir it used)")
    return paths


def launch_run(state_dir: Path, run_config: Mapping[str, Any], *, app_dir: Path | None = None,
               stream: bool = True, out: Any = None) -> int:
    """``flwr run APP fedfusion --run-config ...``; with ``stream`` it shows the log until the run ends
    and returns 0 only if the SuperLink reports it ``finished:completed`` (server/run_outcome.py), with
    one line on ``out`` (stderr) saying how it ended. Detached, it returns 0 once the run is started."""
    from fedfusion.server.run_outcome import (
        EXIT_RUN_FAILED,
        flwr_list_run,
        start_failure,
        started_run_id,
        wait_for_outcome,
    )

    out = out or sys.stderr
    paths = existing_state(state_dir)
    env = tool_env({"FLWR_HOME": str(paths.flwr_home)})
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    cmd = [executable("flwr"), "run", str(app_dir or default_app_dir()), CONNECTION, "--format", "json"]
    if overrides:
        cmd += ["--run-config", overrides]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True)
    run_id = started_run_id(started.stdout)
    if run_id is None:
        print(f"error: the SuperLink did not start the run: {start_failure(started.stdout, started.stderr)}",
              file=out)
        return EXIT_RUN_FAILED
    print(f"started run {run_id}", file=out)
    if not stream:
        return 0
    subprocess.call([executable("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=env)
    outcome = wait_for_outcome(flwr_list_run(executable("flwr"), CONNECTION, env), run_id)
    print(("" if outcome.exit_code == 0 else "error: ") + outcome.message(), file=out)
    return outcome.exit_code


def run_status(state_dir: Path) -> int:
    """``flwr ls``: the runs the SuperLink knows, with their status."""
    paths = existing_state(state_dir)
    # Piped into a script or a log, Flower's table is 80 columns wide and cuts the status to "finished:…".
    wide = {} if sys.stdout.isatty() else {"COLUMNS": "200"}
    return subprocess.call([executable("flwr"), "ls", CONNECTION],
                           env=tool_env({"FLWR_HOME": str(paths.flwr_home), **wide}))


def stop_run(state_dir: Path, run_id: int) -> int:
    """``flwr stop``: ask the SuperLink to stop a run; its last checkpoint stays for ``fedfusion run --resume``."""
    paths = existing_state(state_dir)
    return subprocess.call([executable("flwr"), "stop", str(run_id), CONNECTION],
                           env=tool_env({"FLWR_HOME": str(paths.flwr_home)}))


def list_nodes(state_dir: Path) -> list[dict[str, Any]]:
    """The SuperNodes the SuperLink knows (``flwr supernode list --format json``): id, status, online/offline times."""
    paths = existing_state(state_dir)
    done = subprocess.run([executable("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
                          capture_output=True, text=True, env=tool_env({"FLWR_HOME": str(paths.flwr_home)}),
                          timeout=60)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"could not list sites: {(done.stdout + done.stderr).strip()[-500:]}") from None
    if not answer.get("success", False):
        raise RuntimeError(f"could not list sites: {answer}")
    return list(answer.get("nodes", []))


def site_contributions(run_dir: Path) -> list[dict[str, Any]]:
    """Per site of one run folder: rounds trained and evaluated, last round seen, refusals (from the CSVs)."""
    import csv

    rows: dict[str, dict[str, Any]] = {}
    metrics = run_dir / "site_metrics.csv"
    if metrics.is_file():
        with metrics.open() as handle:
            for record in csv.DictReader(handle):
                site = rows.setdefault(record["site"], {"site": record["site"], "rounds_trained": 0,
                                                        "rounds_evaluated": 0, "last_round": 0, "refusals": 0})
                key = "rounds_trained" if record["phase"] == "train" else "rounds_evaluated"
                site[key] += 1
                site["last_round"] = max(site["last_round"], int(record["round"]))
    summary = run_dir / "summary.json"
    refusals = json.loads(summary.read_text()).get("refusals", []) if summary.is_file() else []
    for record in refusals:  # rounds a site declined (privacy budget or policy), written by the server
        name = str(record.get("site", "?"))
        rows.setdefault(name, {"site": name, "rounds_trained": 0, "rounds_evaluated": 0, "last_round": 0,
                               "refusals": 0})["refusals"] += 1
    return sorted(rows.values(), key=lambda r: r["site"])
