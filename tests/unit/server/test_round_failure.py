"""A round in which every site fails is not recorded as done: the run stops before its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedfusion.client.app import make_client_app
from fedfusion.server.federation import RoundFailed
from tests.dashboard_runs import InProcessGrid, run_in_process, toy_schema
from tests.sitegen import make_site


def test_a_round_where_every_site_fails_stops_the_run_before_its_checkpoint(tmp_path: Path) -> None:
    schema_path = toy_schema().save(tmp_path / "schema.json")
    run_dir = tmp_path / "run"
    run_config = {"num-server-rounds": 2, "min-sites": 2, "seed": 1, "schema": str(schema_path),
                  "run-dir": str(run_dir), "local-epochs": 1, "local-batch-size": 16, "fusion": "concat",
                  "round-timeout": 30.0}
    real = make_client_app(run_config)
    failing = ClientApp()

    @failing.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return real(msg, context)

    @failing.train()
    def train(msg: Message, context: Context) -> Message:  # e.g. every site refused the app bundle
        return Message(Error(code=0, reason="app bundle not approved"), reply_to=msg)

    node_configs = {}
    for node in (1, 2):
        folder = make_site(tmp_path / f"site{node}", n=20, seed=node)
        manifest = folder / "manifest.csv" if folder.is_dir() else folder
        node_configs[node] = {"manifest": str(manifest), "schema": str(schema_path), "site-id": f"S{node}",
                              "device": "cpu"}
    with pytest.raises(RoundFailed, match="round 1: no site returned a usable update .* --resume"):
        run_in_process(InProcessGrid(failing, node_configs), run_config)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    assert "round-0001.pt" not in checkpoints  # resume retries round 1
