"""A real deployment on loopback: `fedfusion coordinator start` (flower-superlink), three
`fedfusion site start` (flower-supernode) processes, each with its own real ovarian study, and
`fedfusion run` for 2 rounds. Every process is killed at the end, pass or fail.

Transport here is --insecure (loopback); TLS and node authentication come with the security work.
"""

from __future__ import annotations

import csv
import subprocess
import time
from pathlib import Path

import pytest

from fedfusion.simulations.loopback import FEDFUSION, LoopbackDeployment

pytestmark = pytest.mark.integration
SITES = ("study-16", "study-13", "study-4")


def test_three_sites_two_rounds_improve_every_site(tmp_path: Path) -> None:
    pytest.importorskip("SurvSet")
    from fedfusion.common.config import load_schema
    from fedfusion.simulations.datasets import build_dataset
    from fedfusion.simulations.partition import partition_manifest

    schema_path = build_dataset("ovarian", tmp_path / "data", seed=0)
    manifests = partition_manifest(tmp_path / "data" / "manifest.csv", load_schema(schema_path), "natural")
    run_dir = tmp_path / "run"
    with LoopbackDeployment(tmp_path / "deploy", schema_path, {s: manifests[s] for s in SITES}) as deployment:
        time.sleep(3)
        done = deployment.run(run_dir, rounds=2, settings={"local-epochs": 2, "round-timeout": 300}, timeout=900)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:], deployment.logs())
        status = subprocess.run([FEDFUSION, "status", "--state-dir", str(deployment.state_dir)],
                                capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "finished" in status.stdout.lower(), status.stdout

    rows = list(csv.DictReader((run_dir / "site_metrics.csv").open()))
    evaluated = {(r["round"], r["site"]): float(r["c_index"]) for r in rows if r["phase"] == "evaluate"}
    assert {site for _, site in evaluated} == set(SITES)
    for site in SITES:
        assert evaluated[("2", site)] > evaluated[("0", site)], (site, evaluated)
    assert (run_dir / "checkpoints" / "round-0002.pt").is_file()
    assert (run_dir / "report.md").read_text().count("study-") >= 3
