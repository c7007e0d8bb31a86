"""A real deployment on loopback, secured as in production: `fedfusion provision` writes the kits,
`fedfusion coordinator start --kit` runs flower-superlink with TLS and SuperNode authentication (and
registers the three site keys), three `fedfusion site start` (flower-supernode) processes connect with
their kit's CA and key, each with its own real ovarian study, and `fedfusion run` trains 2 rounds.
The coordinator's record of every reply it received (``replies.jsonl``) matches the sites' audit logs
line for line. The same deployment then shows that sites outside the federation are turned away, and
that a site which has not approved the app bundle refuses it before reading any data. Every process
is killed at the end, pass or fail.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from collections import Counter
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
    evaluations = [r for r in rows if r["phase"] == "evaluate"]
    assert {r["site"] for r in evaluations} == set(SITES)
    # study-4's test split has 17 cases, under the sites' default min-eval-cases = 20: it releases its
    # size only, never a C-index (client/eval_release.py); the two larger studies report theirs.
    small = [r for r in evaluations if r["site"] == "study-4"]
    assert small and all(r["c_index"] == "" for r in small), small
    evaluated = {(r["round"], r["site"]): float(r["c_index"]) for r in evaluations if r["site"] != "study-4"}
    for site in ("study-16", "study-13"):
        assert evaluated[("2", site)] > evaluated[("0", site)], (site, evaluated)
    assert (run_dir / "checkpoints" / "round-0002.pt").is_file()
    assert (run_dir / "report.md").read_text().count("study-") >= 3
    coordinator_log = dep.logs(tail=1_000_000)["coordinator.log"]
    assert "SuperNode authentication is disabled" not in coordinator_log  # Flower's warning without it
    assert all(f"site {site}: registered" in coordinator_log for site in SITES), coordinator_log[-3000:]
    from fedfusion.client.audit import iter_records
    from fedfusion.server.messaging import read_replies

    # Every reply that left a site is in its audit log (the three loopback sites share one folder) exactly
    # once, under the hash the coordinator computed for the reply it received, and nothing else is there.
    received = read_replies(run_dir / "replies.jsonl")
    (run_id,) = {r["run_id"] for r in received}
    audited = [r for r in iter_records(dep.folder / "audit.jsonl") if r["run_id"] == run_id]
    for site in SITES:
        kinds = sorted((r["round"], r["message_type"]) for r in audited if r["site_id"] == site)
        assert kinds == [(0, "evaluate"), (1, "evaluate"), (1, "train"), (2, "evaluate"), (2, "train")], kinds
    key = ("node_id", "round", "message_type", "sha256")
    on_server = Counter(tuple(r[k] for k in key) for r in received)
    at_sites = Counter(tuple(r[k] for k in key) for r in audited)
    assert on_server == at_sites and set(on_server.values()) == {1} and len(on_server) == 5 * len(SITES)
    assert {r["site_id"] for r in received} == set(SITES)
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
    # study-4 (17 test cases < min-eval-cases 20) releases counts only; the two larger studies score.
    evaluated = {(r["round"], r["site"]): float(r["c_index"]) for r in site_rows
                 if r["phase"] == "evaluate" and r["c_index"] != ""}
    assert {site for _, site in evaluated} == {"study-16", "study-13"}, evaluated
    assert sum(evaluated[("2", s)] > evaluated[("0", s)] for s in ("study-16", "study-13")) >= 1, evaluated
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


def _wait_for_text(path: Path, needle: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and needle in path.read_text():
            return
        time.sleep(0.3)
    raise AssertionError(f"{path} did not log {needle!r} within {timeout} s")


def test_an_unapproved_app_is_refused_before_any_data_is_read(deployment: tuple[LoopbackDeployment, Path]) -> None:
    """A federation site restarts with an allow-list that lacks the run's bundle, then its data goes
    away (after its preflight read it). A DP run: the site answers every message with the approval
    reason, not a data error; the refusals are in its audit log and reach the coordinator under the
    same hashes; its privacy ledger is never charged, while the other two sites train and are charged."""
    from fedfusion.client.approval import fab_hash
    from fedfusion.client.audit import iter_records
    from fedfusion.server.coordinator import default_app_dir
    from fedfusion.server.messaging import read_replies

    dep, root = deployment
    site, bundle = SITES[2], fab_hash(default_app_dir())
    began = time.monotonic()
    dep.kill(dep.sites[site], signal.SIGTERM)
    stopped = time.monotonic()
    dep.start_site(site, dep.site_manifests[site], approved_apps=["f" * 64])
    _wait_for_text(dep.folder / f"site-{site}.log", '"event": "started"')  # its preflight read the data and passed
    manifest = dep.site_manifests[site]
    away = manifest.with_name(manifest.name + ".away")
    manifest.rename(away)  # the site's data cannot be read from now on
    _wait_for_text(dep.folder / f"site-{site}.log", "only 1 approved app bundle(s) may run")  # ready to answer
    print(f"site stopped in {stopped - began:.1f} s, restarted in {time.monotonic() - stopped:.1f} s")
    run_dir = root / "unapproved-run"
    try:
        run_began = time.monotonic()
        done = dep.run(run_dir, rounds=1, settings={"local-epochs": 1, "round-timeout": 300, "dp-mode": "sample",
                                                    "dp-noise-multiplier": 1.0, "target-epsilon": 50.0,
                                                    "study": "approval-test"}, timeout=600)
        print(f"the run took {time.monotonic() - run_began:.1f} s")
    finally:
        away.rename(manifest)
        site_log = (dep.folder / f"site-{site}.log").read_text()  # restarting the site starts a new log
        dep.kill(dep.sites[site], signal.SIGTERM)
        dep.start_site(site, manifest)  # the federation's site as it was (approving the bundle)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:], dep.logs())

    reason = f"refused: this site has not approved app bundle sha256={bundle}"
    received = read_replies(run_dir / "replies.jsonl")
    (run_id,) = {r["run_id"] for r in received}
    refusals = [r for r in iter_records(dep.folder / "audit.jsonl") if r["run_id"] == run_id and r["site_id"] == site]
    # Round 0 may have gone to the site's previous SuperNode (still listed for a moment after its stop, so
    # the SuperLink answers for it); from round 1 on the restarted site answers everything, with refusals.
    kinds = sorted((r["round"], r["message_type"]) for r in refusals)
    assert kinds in ([(0, "evaluate"), (1, "evaluate"), (1, "train")], [(1, "evaluate"), (1, "train")]), refusals
    assert all(r["metrics"]["error"].startswith(reason) and not r["tensors"] for r in refusals), refusals
    node = refusals[0]["node_id"]
    assert sorted(r["sha256"] for r in received if r["node_id"] == node) == sorted(r["sha256"] for r in refusals)
    assert all(r["error"] for r in received if r["node_id"] == node)
    rejected = json.loads((run_dir / "summary.json").read_text())["rejected_replies"]
    assert any(reason in str(r.get("reason")) for r in rejected), rejected  # the coordinator knows why

    assert f"REFUSED run: app bundle sha256={bundle}" in site_log
    assert "only 1 approved app bundle(s) may run" in site_log
    assert manifest.name not in site_log.split('"event": "started"', 1)[1]  # no data error after the preflight
    # The loopback sites keep their ledgers beside their site.toml files, all in one folder (one file).
    ledger = json.loads((dep.folder / "privacy-ledger.json").read_text())["studies"]["approval-test"]["entries"]
    charged = sorted(e.get("site") for e in ledger if e.get("run") == run_id)
    assert charged == sorted(SITES[:2]), ledger  # the two approving sites trained under DP; the refusing one never


def _run_status(dep: LoopbackDeployment) -> str:
    status = subprocess.run([FEDFUSION, "status", "--state-dir", str(dep.state_dir)], capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    return status.stdout


def test_a_run_whose_serverapp_fails_exits_non_zero_with_one_line(deployment: tuple[LoopbackDeployment, Path]) -> None:
    """A run config the ServerApp refuses (ConfigError in the coordinator's process, after the run was
    accepted): `flwr run --stream` would exit 0; `fedfusion run` reads the run's final status instead."""
    dep, root = deployment
    done = dep.run(root / "failing-run", rounds=1, settings={"model-selection": "best-test"}, timeout=300)
    assert done.returncode == 1, (done.stdout[-3000:], done.stderr[-3000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run ") and "FAILED: ServerApp failed with exception" in last, done.stderr[-3000:]
    assert "model-selection must be one of" in last
    assert "finished:failed" in _run_status(dep)


def test_a_run_every_site_refuses_exits_non_zero_and_is_not_completed(
        deployment: tuple[LoopbackDeployment, Path]) -> None:
    """DP-SGD asked without a budget, of sites that have no privacy policy: every site refuses round 1.
    The ServerApp writes its report, then fails: `status` must not say finished:completed for it."""
    dep, root = deployment
    run_dir = root / "refused-run"
    done = dep.run(run_dir, rounds=2, settings={"local-epochs": 1, "round-timeout": 300, "dp-mode": "sample"},
                   timeout=600)
    assert done.returncode == 1, (done.stdout[-3000:], done.stderr[-3000:], dep.logs())
    last = done.stderr.strip().splitlines()[-1]
    # Deployed sites' refusals currently reach the coordinator as rejected replies ("no site returned a usable
    # update"), in-process ones as refusals ("every site that answered refused"); either way the run failed.
    assert "FAILED" in last and ("every site that answered refused to train" in last
                                 or "round 1: no site returned a usable update" in last), done.stderr[-3000:]
    run_id = last.split()[2]
    rows = [line for line in _run_status(dep).splitlines() if f" {run_id} " in f" {line} "]
    assert rows and all("completed" not in row for row in rows), rows
