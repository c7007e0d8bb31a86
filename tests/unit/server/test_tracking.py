"""Experiment tracking logs exactly the numbers of metrics.csv / site_metrics.csv, once per round.

A real federation (the coordinator's round loop and the real ClientApp over an in-process grid, as in
test_model_selection.py) trains one round with TensorBoard and MLflow on, is resumed for a second, and
the values are read back the way the tools read them: TensorBoard's EventAccumulator and MLflow's
client over the local file store. Nothing here contacts a server.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fedfusion.common.config import ConfigError
from fedfusion.server.report import write_run_outputs
from fedfusion.server.tracking import (
    STATE_FILE,
    RunTracking,
    TrackingSettings,
    TrackingUnavailable,
    check_tracking,
    clean_name,
    log_report_files,
)
from tests.dashboard_runs import InProcessGrid, run_in_process, toy_schema
from tests.sitegen import make_site

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A real hospital name with characters MLflow refuses in a metric name (', <, >).
ODD_SITE = "St. Mary's <ICU>"


def _federation(root: Path, run_dir: Path, rounds: int, **extra: Any) -> tuple[InProcessGrid, dict[str, Any]]:
    schema_path = toy_schema().save(root / "schema.json")
    run_config = {"num-server-rounds": rounds, "min-sites": 2, "seed": 5, "schema": str(schema_path),
                  "run-dir": str(run_dir), "local-epochs": 1, "local-batch-size": 16, "fusion": "concat",
                  "round-timeout": 30.0, "model-selection": "last", **extra}
    from fedfusion.client.app import make_client_app

    nodes = {}
    for node, site in enumerate(("north", ODD_SITE), start=1):
        manifest = make_site(root / f"site{node}", n=20, seed=node)
        nodes[node] = {"manifest": str(manifest), "schema": str(schema_path), "site-id": site, "device": "cpu",
                       "min-eval-cases": "0"}
    return InProcessGrid(make_client_app(run_config), nodes), run_config


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _expected(run_dir: Path) -> dict[str, dict[int, float]]:
    """What the tools must show, from the CSV files the report wrote: name -> {round: value}."""
    out: dict[str, dict[int, float]] = {}
    for row in _csv(run_dir / "metrics.csv"):
        for key, cell in row.items():
            if key != "round" and not key.startswith("sigma_") and cell != "":
                out.setdefault(clean_name(key), {})[int(row["round"])] = float(cell)
    for row in _csv(run_dir / "site_metrics.csv"):
        phase = {"train": "train", "evaluate": "eval"}[row["phase"]]
        for key, cell in row.items():
            if key not in ("round", "phase", "site") and cell != "":
                name = f"site/{clean_name(row['site'])}/{phase}_{clean_name(key)}"
                out.setdefault(name, {})[int(row["round"])] = float(cell)
    return out


def _same(logged: Mapping[int, float], expected: Mapping[int, float]) -> bool:
    """Equal per round to 1e-6 (relative: TensorBoard keeps float32); NaN equals NaN (a site without a C-index)."""
    return logged.keys() == expected.keys() and all(
        (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9)
        for a, b in ((logged[k], expected[k]) for k in expected))


def test_tensorboard_and_mlflow_hold_the_csv_numbers_through_a_resume(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    grid, run_config = _federation(tmp_path, run_dir, 1, tracking="tensorboard,mlflow")
    run_in_process(grid, run_config)  # rounds 0 and 1, then the coordinator "stops"
    result = run_in_process(grid, {**run_config, "num-server-rounds": 2, "resume": True})  # round 2 only
    write_run_outputs(result)
    attached = log_report_files(run_config, run_dir)

    expected = _expected(run_dir)
    assert expected["eval_auc"].keys() == {0, 1, 2} and expected["train_loss"].keys() == {1, 2}
    assert f"site/{clean_name(ODD_SITE)}/eval_auc" in expected and clean_name(ODD_SITE) == "St. Mary_s _ICU_"

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, values in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert [step for step, _ in logged] == sorted(values), name  # each round once, in order
        assert _same(dict(logged), values), (name, logged, values)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read its file store
    state = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]
    assert state["tracking_uri"] == (run_dir / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    runs = client.search_runs([state["experiment_id"]])
    assert [r.info.run_id for r in runs] == [state["run_id"]]  # the resume continued the same run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == f"{tmp_path.name}/run"  # last 2 parts of run-dir
    assert client.get_experiment(state["experiment_id"]).name == "fedfusion"
    assert run.data.params["num-server-rounds"] == "1" and run.data.tags["fedfusion.resumed_at_round"] == "2"
    assert set(run.data.metrics) == set(expected)
    for name, values in expected.items():
        history = client.get_metric_history(state["run_id"], name)
        assert sorted(m.step for m in history) == sorted(values), name
        assert _same({m.step: m.value for m in history}, values), (name, history, values)
    assert {"metrics.csv", "site_metrics.csv", "report.md", "summary.json", "run_config.json"} <= set(attached)
    artifacts = {a.path for a in client.list_artifacts(state["run_id"])}
    assert set(attached) == artifacts
    copy = Path(client.download_artifacts(state["run_id"], "metrics.csv", str(tmp_path / "download")))
    assert copy.read_bytes() == (run_dir / "metrics.csv").read_bytes()


def test_tracking_off_creates_no_folders_and_a_missing_extra_fails_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    off = tmp_path / "off"
    grid, run_config = _federation(tmp_path, off, 1)
    result = run_in_process(grid, run_config)
    write_run_outputs(result)
    assert [r["round"] for r in result.rounds] == [0, 1]
    assert log_report_files(run_config, off) == []
    assert not {"tensorboard", "mlruns", STATE_FILE} & {p.name for p in off.iterdir()}

    for backend, module in (("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
        with pytest.raises(TrackingUnavailable) as caught:
            check_tracking({"tracking": f"{backend}"})
        message = str(caught.value)
        assert "\n" not in message and message.endswith('pip install "fedfusion[tracking]"'), message
        assert f'tracking = "{backend}"' in message
        refused = tmp_path / f"refused-{backend}"
        with pytest.raises(TrackingUnavailable):
            run_in_process(grid, {**run_config, "run-dir": str(refused), "tracking": backend})
        assert not (refused / "checkpoints").exists()  # refused before round 0, nothing trained


def test_settings_names_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown \\['wandb'\\]"):
        check_tracking({"tracking": "tensorboard,wandb"})
    assert check_tracking({"tracking": " MLflow , tensorboard,mlflow"}) == ("mlflow", "tensorboard")
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    check_tracking({"tracking": "mlflow"})
    assert __import__("os").environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # no usage data leaves the coordinator
    # a shared tracking folder: one MLflow store, one TensorBoard sub-folder per run, named by the study key
    shared = TrackingSettings.from_run_config({"tracking": "tensorboard", "tracking-dir": str(tmp_path / "t"),
                                               "run-dir": str(tmp_path / "a" / "federated"), "study": "s1/seed-0"})
    assert shared.tensorboard_dir == tmp_path / "t" / "tensorboard" / "s1" / "seed-0"
    assert shared.mlflow_uri == (tmp_path / "t" / "mlruns").as_uri() and shared.run_name == "s1/seed-0"
    assert TrackingSettings.from_run_config({"mlflow-tracking-uri": "http://mlflow:5000"}).mlflow_uri == (
        "http://mlflow:5000")
    for odd in ("..", "a:b/c", "<script>alert(1)</script>", ""):
        name = clean_name(odd)
        assert name and name.strip(".") and "/" not in name and ":" not in name and "<" not in name


class _Recorder:
    def __init__(self, name: str, fail_at: int | None = None) -> None:
        self.name, self.fail_at, self.logged, self.closed = name, fail_at, [], None

    def start(self, first_round: int) -> None:
        self.first = first_round

    def log_round(self, step: int, scalars: Mapping[str, float]) -> None:
        if step == self.fail_at:
            raise OSError("server gone")
        self.logged.append((step, dict(scalars)))

    def close(self, failed: bool) -> None:
        self.closed = failed


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    flaky, steady = _Recorder("flaky", fail_at=1), _Recorder("steady")
    site_rows = [{"round": 0, "phase": "evaluate", "site": "A", "auc": 0.5, "note": "text"},
                 {"round": 1, "phase": "train", "site": "A", "loss": 0.7, "num-examples": 12}]
    with caplog.at_level(logging.WARNING, "fedfusion.server.tracking"), \
            RunTracking({"tracking": ""}, trackers=[flaky, steady]) as tracking:
        tracking.start(first_round=0)
        for step in (0, 1, 2):
            tracking.log_round({"round": step, "eval_auc": 0.5 + step / 10, "sites_trained": 2}, site_rows)
    assert [s for s, _ in flaky.logged] == [0] and flaky.closed is True
    assert [s for s, _ in steady.logged] == [0, 1, 2] and steady.closed is False
    assert steady.logged[0][1] == {"eval_auc": 0.5, "sites_trained": 2.0, "site/A/eval_auc": 0.5}
    assert steady.logged[1][1]["site/A/train_num-examples"] == 12.0
    assert sum("flaky failed at round 1" in r.getMessage() for r in caplog.records) == 1

    crashed = _Recorder("crashed")  # a round that raises: the run is closed as failed (MLflow status FAILED)
    with pytest.raises(RuntimeError), RunTracking({}, trackers=[crashed]) as tracking:
        tracking.start(first_round=3)
        raise RuntimeError("round 3: no site returned a usable update")
    assert crashed.first == 3 and crashed.closed is True


def test_simulate_flags_reach_the_run_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import fedfusion.simulations.simulate as simulate_module
    from fedfusion.cli import main
    from fedfusion.simulations.simulate import run_config_for

    seen = {}

    def fake_simulate(spec, on_round=None, on_step=None):  # the flags are under test, not a Ray run
        seen["spec"] = spec
        (tmp_path / "report.md").write_text("# report\n")
        return tmp_path / "report.md"

    monkeypatch.setattr(simulate_module, "simulate", fake_simulate)
    assert main(["simulate", "--tracking", "tensorboard,mlflow", "--tracking-dir", str(tmp_path / "tracks"),
                 "--mlflow-uri", "sqlite:///mlflow.db", "--out", str(tmp_path / "run")]) == 0
    config = run_config_for(seen["spec"], tmp_path / "schema.json", {"A": tmp_path / "a.csv"})
    assert (config["tracking"], config["tracking-dir"], config["mlflow-tracking-uri"]) == (
        "tensorboard,mlflow", str(tmp_path / "tracks"), "sqlite:///mlflow.db")
    assert main(["simulate", "--out", str(tmp_path / "plain")]) == 0
    assert not {"tracking", "tracking-dir", "mlflow-tracking-uri"} & set(
        run_config_for(seen["spec"], tmp_path / "schema.json", {"A": tmp_path / "a.csv"}))
