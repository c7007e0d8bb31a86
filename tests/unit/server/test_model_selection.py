"""The delivered model is the round with the best federated validation score, never chosen on test:
sites report val metrics, the server weights them by validation size, keeps the best round through a
resume, and ``model.pt`` holds exactly that round's weights (``model-selection = "last"``: the last)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MetricRecord

from fedfusion.client.app import make_client_app
from fedfusion.common.config import ConfigError
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.records import CONFIG_KEY, METRICS_KEY
from fedfusion.server.federation import load_checkpoint, weighted_metric_mean
from fedfusion.server.model_selection import BestRound
from fedfusion.server.report import write_run_outputs
from tests.dashboard_runs import InProcessGrid, run_in_process, toy_schema
from tests.sitegen import make_site

#: The validation AUC the sites will claim per round: round 2 is best, the last round is not.
VAL_AUC = {0: 0.99, 1: 0.60, 2: 0.90, 3: 0.70}


def test_best_round_ranks_by_metric_then_loss_and_ignores_round_zero_and_nan() -> None:
    best = BestRound("auc")
    live = {"w": np.zeros(2, dtype=np.float32)}

    def arrays() -> dict[str, np.ndarray]:
        return live

    assert not best.offer({"round": 0, "eval_val_auc": 1.0}, arrays)  # the initial model is never delivered
    assert not best.offer({"round": 1, "eval_val_auc": math.nan}, arrays)
    assert best.offer({"round": 1, "eval_val_auc": 0.8, "eval_val_loss": 0.5}, arrays)
    live["w"] += 1  # the kept copy must not follow later changes of the live arrays
    assert float(best.arrays["w"][0]) == 0.0  # type: ignore[index]
    assert not best.offer({"round": 2, "eval_val_auc": 0.8, "eval_val_loss": 0.6}, arrays)  # tie, worse loss
    assert best.offer({"round": 3, "eval_val_auc": 0.8, "eval_val_loss": 0.4}, arrays)  # tie, better loss
    assert best.round == 3 and best.arrays is not None and float(best.arrays["w"][0]) == 1.0
    restored = BestRound.from_state(best.state(), "auc")
    assert (restored.round, restored.score, restored.loss) == (3, 0.8, 0.4)
    assert BestRound.from_state(best.state(), "c_index").round is None  # another metric: start afresh


def test_validation_metrics_are_weighted_by_validation_size() -> None:
    sites = [{"num-examples": 100.0, "auc": 0.5, "num-examples-val": 10.0, "val_auc": 0.9},
             {"num-examples": 10.0, "auc": 1.0, "num-examples-val": 30.0, "val_auc": 0.5}]
    mean = weighted_metric_mean(sites)
    assert mean["num-examples-val"] == 40.0
    assert mean["val_auc"] == pytest.approx((10 * 0.9 + 30 * 0.5) / 40)
    assert mean["auc"] == pytest.approx((100 * 0.5 + 10 * 1.0) / 110)


def test_unknown_model_selection_is_refused() -> None:
    with pytest.raises(ConfigError, match="model-selection must be one of"):
        FederationConfig.from_run_config({"model-selection": "best-test"})


def _grid(tmp_path: Path, run_config: dict) -> InProcessGrid:
    real = make_client_app(run_config)
    seen_real: list[dict] = []

    def app(msg: Message, context: Context) -> Message:
        reply = real(msg, context)
        if msg.metadata.message_type.startswith("evaluate") and reply.has_content():
            metrics = dict(reply.content[METRICS_KEY])
            seen_real.append(metrics)
            metrics["val_auc"] = VAL_AUC[int(msg.content[CONFIG_KEY]["server-round"])]
            reply.content[METRICS_KEY] = MetricRecord(metrics)
        return reply

    nodes = {}
    for node in (1, 2):
        folder = make_site(tmp_path / f"site{node}", n=30, seed=node)
        manifest = folder / "manifest.csv" if folder.is_dir() else folder
        # 6 val / 6 test cases: these toy sites opt out of the min-eval-cases rule (client/eval_release.py)
        nodes[node] = {"manifest": str(manifest), "schema": run_config["schema"], "site-id": f"S{node}",
                       "device": "cpu", "min-eval-cases": "0"}
    grid = InProcessGrid(app, nodes)
    grid.seen_real = seen_real  # type: ignore[attr-defined]
    return grid


def _model_equals_checkpoint(run_dir: Path, server_round: int) -> bool:
    model = torch.load(run_dir / "model.pt", weights_only=False)
    saved = load_checkpoint(run_dir / "checkpoints" / f"round-{server_round:04d}.pt")["arrays"]
    return all(np.array_equal(model["state_dict"][k].numpy(), np.asarray(v)) for k, v in saved.items())


def test_the_best_validation_round_is_delivered_and_survives_a_resume(tmp_path: Path) -> None:
    schema_path = toy_schema().save(tmp_path / "schema.json")
    run_dir = tmp_path / "run"
    run_config = {"num-server-rounds": 2, "min-sites": 2, "seed": 1, "schema": str(schema_path),
                  "run-dir": str(run_dir), "local-epochs": 1, "local-batch-size": 16, "fusion": "concat",
                  "round-timeout": 30.0}
    grid = _grid(tmp_path, run_config)
    first = run_in_process(grid, run_config)
    # the sites really score their val split: each reports its size and a validation loss
    real = grid.seen_real  # type: ignore[attr-defined]
    assert real and all(m["num-examples-val"] == 6 and math.isfinite(m["val_loss"]) for m in real)
    assert first.selected_round == 2 and first.selection == "best-val"

    # two more rounds after a "restart": round 3 scores worse on validation, so round 2 stays delivered
    result = run_in_process(grid, {**run_config, "num-server-rounds": 3, "resume": True})
    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3]
    assert result.selected_round == 2 and _model_equals_checkpoint(run_dir, 2)
    assert not _model_equals_checkpoint(run_dir, 3)
    write_run_outputs(result)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [float(r["eval_val_auc"]) for r in rows] == pytest.approx([VAL_AUC[n] for n in range(4)])
    assert {float(r["eval_num-examples-val"]) for r in rows} == {12.0}
    # the report's per-site table is the test metrics the sites reported for round 2's model
    from fedfusion.server.report import final_site_metrics

    round2 = {m["site"]: m["auc"] for m in result.site_metrics if m["phase"] == "evaluate" and m["round"] == 2}
    assert {s: m["auc"] for s, m in final_site_metrics(result).items()} == round2
    assert "The model of round 2" in (run_dir / "report.md").read_text()

    last = run_in_process(grid, {**run_config, "num-server-rounds": 3, "resume": True, "model-selection": "last",
                       "run-dir": str(run_dir)})
    assert last.selected_round == 3 and last.selection == "last" and _model_equals_checkpoint(run_dir, 3)
