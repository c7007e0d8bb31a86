"""`fedfusion coordinator sites/stop`: what the coordinator learns per site, from Flower and the run folder."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fedfusion.server import coordinator
from fedfusion.server.coordinator import list_nodes, site_contributions


def test_contributions_count_rounds_and_refusals_per_site(tmp_path: Path) -> None:
    (tmp_path / "site_metrics.csv").write_text(
        "round,phase,site,num-examples\n0,evaluate,A,5\n1,train,A,10\n1,evaluate,A,5\n1,train,B,8\n"
        "2,train,A,10\n")
    (tmp_path / "summary.json").write_text(json.dumps({"refusals": [{"round": 2, "site": "B"},
                                                                    {"round": 3, "site": "C"}]}))
    rows = {r["site"]: r for r in site_contributions(tmp_path)}
    assert rows["A"] == {"site": "A", "rounds_trained": 2, "rounds_evaluated": 2, "last_round": 2, "refusals": 0}
    assert rows["B"]["rounds_trained"] == 1 and rows["B"]["refusals"] == 1
    assert rows["C"]["refusals"] == 1 and rows["C"]["rounds_trained"] == 0


def test_nodes_come_from_flowers_json_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = {"success": True, "nodes": [{"node-id": "42", "status": "online", "online-at": "2026-11-24 10:00:00Z"}]}
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(listing), stderr="")

    monkeypatch.setattr(coordinator.subprocess, "run", fake_run)
    coordinator.write_connection(coordinator.CoordinatorPaths(tmp_path), "127.0.0.1:9092", insecure=True)
    assert list_nodes(tmp_path)[0]["node-id"] == "42"
    assert calls[0][1:] == ["supernode", "list", coordinator.CONNECTION, "--format", "json"]


def test_an_unreachable_superlink_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coordinator.subprocess, "run", lambda cmd, **_: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="Connection refused"))
    coordinator.write_connection(coordinator.CoordinatorPaths(tmp_path), "127.0.0.1:9092", insecure=True)
    with pytest.raises(RuntimeError, match="could not list sites: Connection refused"):
        list_nodes(tmp_path)
