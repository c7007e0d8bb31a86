"""A simulated run (`flwr run .` on a --simulation SuperLink) that cannot find its sites' data stops in the
ServerApp with one line naming the key and the command that builds the data, before any round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from fedfusion.client.app import make_client_app
from fedfusion.common.config import ConfigError
from fedfusion.server.app import is_simulation, make_server_app, simulation_inputs_problem
from tests.dashboard_runs import RUN_ID, InProcessGrid, toy_schema

BUILD = "fedfusion datasets build ovarian data/ovarian --partition natural"


def _sites(tmp_path: Path, names: tuple[str, ...] = ("A", "B")) -> dict[str, Any]:
    """A run config whose schema and site manifests exist (the manifests' content is not read here)."""
    schema = toy_schema().save(tmp_path / "schema.json")
    for name in names:
        (tmp_path / f"site-{name}.csv").write_text("case_id\n")
    return {"schema": str(schema), "data-dir": str(tmp_path), "sites": ",".join(names)}


def test_missing_keys_are_named_with_the_command_that_builds_them() -> None:
    problem = simulation_inputs_problem({}, 2)
    assert problem is not None and problem.startswith("run config lacks 'schema', 'data-dir', 'sites':")
    assert BUILD in problem and "\n" not in problem
    only_sites = simulation_inputs_problem({"schema": "s.json", "data-dir": "d"}, 2)
    assert only_sites is not None and only_sites.startswith("run config lacks 'sites':")


def test_missing_files_are_named_with_the_folder_relative_paths_start_at(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    config = _sites(tmp_path)
    monkeypatch.chdir(tmp_path)
    no_schema = simulation_inputs_problem({**config, "schema": "nowhere/schema.json"}, 2)
    assert no_schema is not None and "schema = 'nowhere/schema.json': no such file" in no_schema
    assert f"relative paths start at {tmp_path}" in no_schema and BUILD in no_schema
    no_site = simulation_inputs_problem({**config, "sites": "A,B,C"}, 3)
    assert no_site is not None and f"1 of 3 site manifests are missing, e.g. {tmp_path / 'site-C.csv'}" in no_site


def test_supernodes_must_match_the_sites(tmp_path: Path) -> None:
    config = _sites(tmp_path, ("A", "B", "C"))
    assert simulation_inputs_problem(config, 3) is None
    wrong = simulation_inputs_problem(config, 2)  # Flower's default is 2 simulated SuperNodes
    assert wrong is not None and "2 SuperNodes but run config 'sites' lists 3 (A,B,C)" in wrong
    assert '--federation-config "num-supernodes=3"' in wrong


def test_scale_mode_needs_the_pooled_manifest_not_sites(tmp_path: Path) -> None:
    config = {**_sites(tmp_path), "sites": "", "scale-sites": 100}
    problem = simulation_inputs_problem(config, 100)
    assert problem is not None and f"no {tmp_path / 'manifest.csv'}" in problem
    (tmp_path / "manifest.csv").write_text("case_id\n")
    assert simulation_inputs_problem(config, 100) is None  # 100 virtual sites, whatever `sites` says


def test_simulation_is_recognised_by_flowers_grid_or_the_run_config() -> None:
    # Canary: Flower 1.41's simulation Grid; if Flower renames it, a bare `flwr run .` gets the sites' errors
    # instead of the one line (the run-config test below still holds).
    from flwr.superlink.grid import InMemoryGrid

    assert is_simulation(object.__new__(InMemoryGrid), {})
    deployed = InProcessGrid(app=None, node_configs={})
    assert not is_simulation(deployed, {"schema": "s.json", "run-dir": "runs/x", "scale-sites": 0})
    assert is_simulation(deployed, {"data-dir": "data/ovarian"}) and is_simulation(deployed, {"scale-sites": 5})


def test_the_server_app_stops_before_round_zero(tmp_path: Path) -> None:
    run_config = {"schema": str(toy_schema().save(tmp_path / "s.json")),
                  "data-dir": str(tmp_path), "sites": "A,B", "run-dir": str(tmp_path / "run")}
    grid = InProcessGrid(app=make_client_app(run_config), node_configs={1: {"partition-id": 0}, 2: {"partition-id": 1}})
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ConfigError, match=r"2 of 2 site manifests are missing, e\.g\. .*site-A\.csv"):
        make_server_app()(grid, context)
    assert not (tmp_path / "run").exists()  # nothing written, no site asked
