"""docs/flower-cli.md, performed as written with real processes: `fedfusion datasets build ... --partition
natural` writes the site data and prints the `flwr run` line; our own `flower-superlink --simulation` (never
Flower's detached `:local:` one) runs that exact line from the fedfusion folder; `flwr ls` reports the run
finished and the run folder holds a report with a C-index above chance. The SuperLink (and what it started)
is killed by process group at the end. A run without the data keys fails in the ServerApp before round 0
(tests/unit/server/test_simulation_inputs.py; a second Ray start here would cost ~30 s of CI for it).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedfusion.common.flower_tools import executable, tool_env
from fedfusion.server.run_outcome import flwr_list_run, started_run_id, wait_for_outcome

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CONNECTION = "sim"
# Step 1 of docs/flower-cli.md, with a free port instead of 9093.
CONFIG = """[superlink]
default = "sim"

[superlink.sim]
address = "127.0.0.1:{port}"
insecure = true
"""


@dataclass(frozen=True)
class SimulationLink:
    root: Path
    env: dict[str, str]
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"flower-superlink exited early:\n{log.read_text()[-3000:]}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    pytest.fail(f"flower-superlink did not listen within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulationLink]:
    """A simulation SuperLink started as the page says, in a folder of its own (so a relative path in a
    run config would not resolve to the test's folder), with a private FLWR_HOME holding the connection."""
    pytest.importorskip("SurvSet")  # the ovarian cohorts
    root = tmp_path_factory.mktemp("flwr-run")
    port = _free_port()
    home = root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG.format(port=port))
    env = tool_env({"FLWR_HOME": str(home), "COLUMNS": "200"})  # wide tables: statuses are not cut to "finished:…"
    workdir = root / "superlink-cwd"
    workdir.mkdir()
    log = root / "superlink.log"
    with log.open("w") as out:
        proc = subprocess.Popen([executable("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
                                 "--port", str(port), "--disable-runtime-dependency-installation"],
                                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_listening(port, proc, log)
        yield SimulationLink(root=root, env=env, log=log)
    finally:  # the SuperLink's group: SuperExec, flwr-simulation and the Ray processes it started
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue


def _flwr_run(link: SimulationLink, argv: list[str]) -> int:
    """Start a run from the fedfusion folder, as the page says; return its id."""
    started = subprocess.run([*argv, "--format", "json"], cwd=REPO, env=link.env, capture_output=True, text=True,
                             timeout=180)
    run_id = started_run_id(started.stdout)
    assert run_id is not None, (started.stdout[-2000:], started.stderr[-2000:])
    return run_id


def _outcome(link: SimulationLink, run_id: int) -> tuple[str, str]:
    outcome = wait_for_outcome(flwr_list_run(executable("flwr"), CONNECTION, link.env), run_id, timeout=300, poll=2)
    return outcome.status, outcome.details


def test_the_documented_recipe_trains_and_writes_the_report(link: SimulationLink) -> None:
    build = subprocess.run([executable("fedfusion"), "datasets", "build", "ovarian", "data/ovarian",
                            "--partition", "natural"], cwd=link.root, env=link.env, capture_output=True, text=True,
                           timeout=180)
    assert build.returncode == 0, build.stderr[-2000:]
    printed = [line.strip() for line in build.stdout.splitlines() if line.strip().startswith("flwr run . ")]
    assert len(printed) == 1, build.stdout
    data = link.root / "data" / "ovarian"
    assert sorted(p.name for p in data.glob("site-*.csv")) == [f"site-study-{n}.csv" for n in (13, 16, 4, 9)]

    # the printed line with CONNECTION = sim, plus the page's second --run-config (1 round keeps it short)
    argv = shlex.split(printed[0].replace(" CONNECTION ", f" {CONNECTION} "))
    argv = [executable("flwr"), *argv[1:], "--run-config", "num-server-rounds=1 local-epochs=1"]
    began = time.monotonic()
    run_id = _flwr_run(link, argv)
    status, details = _outcome(link, run_id)
    seconds = time.monotonic() - began
    assert status == "finished:completed", (details, link.log.read_text()[-3000:])

    listing = subprocess.run([executable("flwr"), "ls", CONNECTION], env=link.env, capture_output=True, text=True,
                             timeout=120)
    assert str(run_id) in listing.stdout and "finished:completed" in listing.stdout, listing.stdout
    shown = subprocess.run([executable("flwr"), "log", str(run_id), CONNECTION, "--show"], env=link.env,
                           capture_output=True, text=True, timeout=120)
    assert "aggregate_train: Received 4 results and 0 failures" in shown.stdout + shown.stderr

    run_dir = link.root / "runs" / "flwr-ovarian"  # the printed run-dir: under the build's folder, not the link's
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["round"] for r in rows] == ["0", "1"]
    assert float(rows[1]["eval_c_index"]) > 0.5 and int(rows[1]["sites_trained"]) == 4, rows[1]
    evaluated = {r["site"] for r in csv.DictReader((run_dir / "site_metrics.csv").open()) if r["phase"] == "evaluate"}
    assert evaluated == {"study-13", "study-16", "study-4", "study-9"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"][-1]["round"] == 1 and not summary.get("ended_early")
    report = (run_dir / "report.md").read_text()
    assert all(site in report for site in evaluated) and (run_dir / "model.pt").is_file()
    assert not any((link.root / "superlink-cwd").iterdir())  # nothing landed in the SuperLink's folder
    print(f"flwr run, 4 simulated sites, 1 round: {seconds:.0f} s to finished:completed; "
          f"C-index {float(rows[0]['eval_c_index']):.3f} -> {float(rows[1]['eval_c_index']):.3f}")

