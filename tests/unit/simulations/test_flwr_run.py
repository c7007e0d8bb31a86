"""`fedfusion datasets build NAME OUT --partition P`: the site layout a `flwr run .` simulation reads, and a
printed `flwr run` line that Flower's own parser turns back into exactly that run config."""

from __future__ import annotations

import shlex
from pathlib import Path

import pandas as pd
import pytest

from fedfusion.cli import main
from fedfusion.common.federation_config import FederationConfig
from fedfusion.server.app import simulation_inputs_problem
from fedfusion.simulations.flwr_run import FlwrRunData


def _flower_parse(argv: list[str], flag: str) -> dict[str, object]:
    """What `flwr run` makes of every ``flag`` value (its own parser, as `flwr run` calls it)."""
    from flwr.common.config import parse_config_args

    return parse_config_args([argv[i + 1] for i, a in enumerate(argv) if a == flag])


def test_the_printed_line_round_trips_through_flowers_parser(tmp_path: Path) -> None:
    folder = tmp_path / "my data" / "ovarian"  # a space: quoting must survive the shell and Flower
    data = FlwrRunData(schema=folder / "schema.json", data_dir=folder, sites=("study-13", "study-4"),
                       run_dir=tmp_path / "runs" / "x")
    argv = shlex.split(data.command("sim"))
    assert argv[:4] == ["flwr", "run", ".", "sim"]
    assert _flower_parse(argv, "--run-config") == data.run_config()
    assert _flower_parse(argv, "--federation-config") == {"num-supernodes": 2}
    cfg = FederationConfig.from_run_config(data.run_config())
    assert (cfg.data_dir, cfg.sites, cfg.schema) == (str(folder), ("study-13", "study-4"), str(folder / "schema.json"))


def test_build_writes_the_sites_and_prints_the_flwr_run_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("SurvSet")  # the ovarian cohorts
    monkeypatch.chdir(tmp_path)
    assert main(["datasets", "build", "ovarian", "data/ovarian", "--partition", "natural"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "partition-id 0..3 = study-13, study-16, study-4, study-9" in lines[0]
    command = next(line for line in lines if line.startswith("flwr run . CONNECTION "))
    run_config = _flower_parse(shlex.split(command), "--run-config")
    data = tmp_path / "data" / "ovarian"
    assert run_config == {"schema": str(data / "schema.json"), "data-dir": str(data),
                          "sites": "study-13,study-16,study-4,study-9",
                          "run-dir": str(tmp_path / "runs" / "flwr-ovarian")}
    # every patient in exactly one site manifest, split kept from the pooled manifest
    pooled = pd.read_csv(data / "manifest.csv", dtype=str)
    sites = {s: pd.read_csv(data / f"site-{s}.csv", dtype=str) for s in str(run_config["sites"]).split(",")}
    assert sum(len(f) for f in sites.values()) == len(pooled) == 912
    assert all(set(f["site"]) == {s} for s, f in sites.items())
    assert simulation_inputs_problem(run_config, 4) is None  # the ServerApp's own check accepts it
    assert "num-supernodes=4" in (simulation_inputs_problem(run_config, 2) or "")


def test_a_partition_that_cannot_be_made_is_an_error_not_a_traceback(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("SurvSet")
    code = main(["datasets", "build", "ovarian", str(tmp_path / "o"), "--partition", "iid", "--num-sites", "200"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "partition 'iid' failed" in errors[0], captured.err[-2000:]
    assert "flwr run" not in captured.out  # no line to run for data that was not written


def test_site_options_without_partition_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets", "build", "ovarian", str(tmp_path / "o"), "--run-dir", "runs/x"]) == 2
    assert "add --partition" in capsys.readouterr().err and not (tmp_path / "o").exists()
