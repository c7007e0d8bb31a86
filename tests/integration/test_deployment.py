"""A real deployment on loopback, secured as in production: `fedfusion provision` writes the kits,
`fedfusion coordinator start --kit` runs flower-superlink with TLS and SuperNode authentication (and
registers the three site keys), three `fedfusion site start` (flower-supernode) processes connect with
their kit's CA and key, each with its own real ovarian study, and `fedfusion run` trains 2 rounds.
The same deployment then shows that sites outside the federation are turned away. Every process is
killed at the end, pass or fail.
"""

from __future__ import annotations

import csv
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedfusion.simulations.loopback import FEDFUSION, LoopbackDeployment

pytestmark = pytest.mark.integration
SITES = ("study-16", "study-13", "study-4")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackDeployment, Path]]:
    """One secured coordinator + 3 sites for every test in this module (starting one costs ~30 s)."""
    pytest.importorskip("SurvSet")
    from fedfusion.common.config import load_schema
    from fedfusion.simulations.datasets import build_dataset
    from fedfusion.simulations.partition import partition_manifest

    root = tmp_path_factory.mktemp("deployment")
    schema_path = build_dataset("ovarian", root / "data", seed=0)
    manifests = partition_manifest(root / "data" / "manifest.csv", load_schema(schema_path), "natural")
    from fedfusion.client.approval import fab_hash
    from fedfusion.server.coordinator import default_app_dir

    # Every site approves exactly the bundle `fedfusion run` will send: if our hash ever differs from
    # the FAB hash Flower computes, every site refuses the run and the tests below fail.
    approved = [fab_hash(default_app_dir())]
    with LoopbackDeployment(root / "deploy", schema_path, {s: manifests[s] for s in SITES},
                            approved_apps=approved) as dep:
        yield dep, root


def test_three_sites_two_rounds_improve_every_site(deployment: tuple[LoopbackDeployment, Path]) -> None:
    dep, root = deployment
    run_dir = root / "run"
    time.sleep(3)
    done = dep.run(run_dir, rounds=2, settings={"local-epochs": 2, "round-timeout": 300}, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:], dep.logs())
    status = subprocess.run([FEDFUSION, "status", "--state-dir", str(dep.state_dir)],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "finished" in status.stdout.lower(), status.stdout

    rows = list(csv.DictReader((run_dir / "site_metrics.csv").open()))
    evaluated = {(r["round"], r["site"]): float(r["c_index"]) for r in rows if r["phase"] == "evaluate"}
    assert {site for _, site in evaluated} == set(SITES)
    for site in SITES:
        assert evaluated[("2", site)] > evaluated[("0", site)], (site, evaluated)
    assert (run_dir / "checkpoints" / "round-0002.pt").is_file()
    assert (run_dir / "report.md").read_text().count("study-") >= 3
    coordinator_log = dep.logs(tail=1_000_000)["coordinator.log"]
    assert "SuperNode authentication is disabled" not in coordinator_log  # Flower's warning without it
    assert all(f"site {site}: registered" in coordinator_log for site in SITES), coordinator_log[-3000:]
    from fedfusion.client.audit import iter_records

    # Every reply that left a site is in its audit log (the three loopback sites share one folder).
    audited = list(iter_records(dep.folder / "audit.jsonl"))
    for site in SITES:
        kinds = {(r["message_type"], r["round"]) for r in audited if r["site_id"] == site}
        assert {("evaluate", 0), ("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2)} <= kinds, kinds
    site_logs = dep.logs(tail=1_000_000)
    assert all("only 1 approved app bundle(s) may run" in site_logs[f"site-{site}.log"] for site in SITES)
    sites = subprocess.run([FEDFUSION, "coordinator", "sites", "--state-dir", str(dep.state_dir),
                            "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert sites.returncode == 0, sites.stderr
    assert all(site in sites.stdout for site in SITES), sites.stdout  # per-site contributions table
    from fedfusion.server.coordinator import list_nodes

    statuses = [node["status"] for node in list_nodes(dep.state_dir)]
    assert statuses.count("online") >= len(SITES), statuses


def test_two_secure_aggregation_rounds_over_tls(deployment: tuple[LoopbackDeployment, Path]) -> None:
    """The same provisioned sites run SecAgg+ rounds through real SuperLink/SuperNode processes: the
    server only unmasks the sum, every site is in it, and the model still improves."""
    dep, root = deployment
    run_dir = root / "secure-run"
    done = dep.run(run_dir, rounds=2, settings={"local-epochs": 2, "round-timeout": 300,
                                                "secure-aggregation": "true", "secagg-timeout": 120}, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:], dep.logs())
    rounds = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["round"] != "0"]
    assert [r["round"] for r in rounds] == ["1", "2"]
    for row in rounds:
        assert row["secagg_failed"] in ("0", "False", "false", "0.0"), row
        assert float(row["secagg_masked"]) == len(SITES) and float(row["secagg_sites"]) == len(SITES), row
    site_rows = list(csv.DictReader((run_dir / "site_metrics.csv").open()))
    assert not [r for r in site_rows if r["phase"] == "train"], "a secure round must not report per-site training"
    evaluated = {(r["round"], r["site"]): float(r["c_index"]) for r in site_rows if r["phase"] == "evaluate"}
    assert sum(evaluated[("2", s)] > evaluated[("0", s)] for s in SITES) >= 2, evaluated
    from fedfusion.client.audit import iter_records

    stages = {r["message_type"] for r in iter_records(dep.folder / "audit.jsonl") if r["run_id"] and r["round"] == 2}
    assert {"train.secagg_advertise_keys", "train.secagg_masked_input", "train.secagg_unmask"} <= stages, stages


def test_sites_outside_the_federation_are_refused(deployment: tuple[LoopbackDeployment, Path]) -> None:
    """An unregistered key, no key at all, and a foreign CA: each site exits with an error of its own."""
    from fedfusion.server.provision import provision

    dep, root = deployment
    foreign = provision(root / "foreign-kits", ["intruder", "wrong-ca"], ["127.0.0.1"], port=dep.port).root
    manifest = dep.site_manifests[SITES[0]]
    real_ca = dep.kits / "coordinator" / "ca.pem"
    procs = {
        # max_restarts=0: the site supervisor would otherwise retry a refused site forever (with backoff)
        "intruder": dep.start_site("intruder", manifest, kit=foreign / "intruder", ca=real_ca, warm=False,
                                   max_restarts=0),
        "keyless": dep.start_site("keyless", manifest, kit=dep.kits / SITES[0], auth=False, warm=False,
                                  max_restarts=0),
        "wrong-ca": dep.start_site("wrong-ca", manifest, kit=foreign / "wrong-ca", warm=False, max_restarts=0),
    }
    codes = {name: proc.wait(timeout=180) for name, proc in procs.items()}
    logs = dep.logs(tail=20_000)
    assert all(code != 0 for code in codes.values()), (codes, logs)
    assert "Failed to activate SuperNode" in logs["site-intruder.log"], logs["site-intruder.log"]  # code 2004
    assert "must be registered" in logs["site-keyless.log"], logs["site-keyless.log"]  # code 2001: auth is on
    assert "certificate verify failed" in logs["site-wrong-ca.log"].lower(), logs["site-wrong-ca.log"]
    for site in SITES:  # the federation's own sites are still connected
        assert dep.sites[site].poll() is None, logs[f"site-{site}.log"]
