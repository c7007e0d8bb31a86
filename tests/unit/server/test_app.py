"""The deployed ServerApp fails (so Flower records ``finished:failed``) when the run did not do what was asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from fedfusion.client.app import make_client_app
from fedfusion.common.flower_adapter import MessageIdentity, message_identity
from fedfusion.server.app import make_server_app
from fedfusion.server.federation import RunIncomplete
from tests.dashboard_runs import RUN_ID, InProcessGrid, toy_schema
from tests.sitegen import make_site


def _serverapp_identity() -> MessageIdentity:
    """The task identity Flower's runtime sets in a ServerApp process (messages need it); restored on exit."""
    return message_identity(task_id=1, run_id=RUN_ID, node_id=0)


def _refusing_federation(tmp_path: Path) -> tuple[InProcessGrid, dict[str, Any]]:
    """Two real sites without a privacy policy, asked for DP-SGD without a budget: both refuse round 1."""
    schema_path = toy_schema().save(tmp_path / "schema.json")
    run_config = {"num-server-rounds": 2, "min-sites": 2, "seed": 1, "schema": str(schema_path),
                  "run-dir": str(tmp_path / "run"), "local-epochs": 1, "local-batch-size": 16, "fusion": "concat",
                  "dp-mode": "sample", "round-timeout": 60.0}
    nodes = {}
    for node in (1, 2):
        folder = make_site(tmp_path / f"site{node}", n=20, seed=node)
        manifest = folder / "manifest.csv" if folder.is_dir() else folder
        nodes[node] = {"manifest": str(manifest), "schema": str(schema_path), "site-id": f"S{node}", "device": "cpu"}
    return InProcessGrid(make_client_app(run_config), nodes), run_config


def _context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_a_run_every_site_refused_fails_after_writing_its_report(tmp_path: Path) -> None:
    grid, run_config = _refusing_federation(tmp_path)
    with _serverapp_identity(), pytest.raises(RunIncomplete, match="round 1: every site that answered refused"):
        make_server_app()(grid, _context(run_config))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ended_early"].startswith("round 1:")
    assert sorted(r["site"] for r in summary["refusals"]) == ["S1", "S2"]


def test_in_process_callers_get_the_result_instead(tmp_path: Path) -> None:
    grid, run_config = _refusing_federation(tmp_path)
    box: list[Any] = []
    with _serverapp_identity():
        make_server_app(on_done=box.append)(grid, _context(run_config))
    assert box[0].ended_early.startswith("round 1:") and len(box[0].refusals) == 2
