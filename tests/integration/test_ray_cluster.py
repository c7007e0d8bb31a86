"""``fedfusion simulate --ray-address`` runs on an EXISTING Ray cluster (docs/ray-cluster.md): a real
single-node cluster from ``ray start --head``, a tiny federation against it, and proof from the
cluster's own job table that the simulation's driver ran there (and did not start a private Ray)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    return env


def _cluster_jobs(address: str) -> list[dict]:
    """The cluster's job table (GCS), read by a short-lived driver of its own."""
    code = ("import json, ray\n"
            f"ray.init(address={address!r}, logging_level='ERROR', include_dashboard=False)\n"
            "from ray._private.state import jobs\n"
            "me = ray.get_runtime_context().get_job_id()\n"
            "print(json.dumps([{k: j[k] for k in ('JobID', 'DriverPid', 'IsDead')} for j in jobs()"
            " if j['JobID'] != me]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """``ray start --head --block`` in its own session; stopped through that process (not ``ray stop``,
    which would stop every Ray instance on a shared machine, not only ours)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ffray")  # short: Ray's unix socket paths must stay < 108 characters
    log = Path(temp) / "ray-start.log"
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=_env())
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert proc.poll() is None, f"ray start exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start did not come up: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: ray start shuts down the node's processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session only
            proc.wait(timeout=30)


def test_simulate_runs_on_an_existing_ray_cluster(ray_cluster: str, tmp_path: Path) -> None:
    assert _cluster_jobs(ray_cluster) == []  # a fresh cluster: no driver has run on it yet
    out = tmp_path / "sim"
    command = [str(BIN / "fedfusion"), "simulate", "--dataset", "wdbc-multimodal", "--partition", "iid",
               "--num-sites", "2", "--rounds", "2", "--local-epochs", "1", "--no-baselines",
               "--ray-address", ray_cluster, "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ray_address"] == ray_cluster
    final = summary["federated_rounds"][-1]
    assert final["round"] == 2 and final["sites_trained"] == 2
    assert final["eval_auc"] > 0.8, final  # learned: well above chance (0.5)
    # the cluster's own record: the simulate process was a driver (job) there, and it has finished
    jobs = _cluster_jobs(ray_cluster)  # (besides itself) the first check's driver and the simulation's
    ours = [j for j in jobs if j["DriverPid"] == proc.pid]
    assert len(jobs) == 2 and len(ours) == 1 and ours[0]["IsDead"], jobs
