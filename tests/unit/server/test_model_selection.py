"""The delivered model is the round the ``model-selection`` rule picks from the federated validation
columns, never chosen on test: sites report val metrics and loss, the server weights them by validation
size, ranks rounds (best-val-loss, best-val; a minimum round; a smoothing window), keeps the choice through
a resume, and ``model.pt`` holds exactly that round's weights (``model-selection = "last"``: the last).
The offline replay benchmarks/model_selection.py scores the rules with the same code."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MetricRecord

from fedfusion.client.app import make_client_app
from fedfusion.common.config import ConfigError
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.records import CONFIG_KEY, METRICS_KEY, numpy_to_arrays
from fedfusion.server.federation import _select_round, load_checkpoint, weighted_metric_mean
from fedfusion.server.model_selection import BestRound, SelectionRule, auto_min_round, choose_round
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
                  "round-timeout": 30.0, "model-selection": "best-val"}
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

    # another rule on the same rounds (no training: all 3 rounds are checkpointed): chosen from the rows kept in
    # the checkpoint, the weights read back from that round's checkpoint
    loss_rule = {"model-selection": "best-val-loss", "model-selection-min-round": 2}
    again = run_in_process(grid, {**run_config, "num-server-rounds": 3, "resume": True, **loss_rule})
    expected = choose_round(result.rounds, SelectionRule("best-val-loss", "auc", min_round=2))
    assert expected in (2, 3) and again.selected_round == expected and again.selection == "best-val-loss"
    assert _model_equals_checkpoint(run_dir, expected)


def _rows(val: dict[int, tuple[float, float]]) -> list[dict[str, float]]:
    """metrics.csv-like rows: round -> (eval_val_c_index, eval_val_loss); NaN = not reported."""
    return [{"round": r, "eval_val_c_index": c, "eval_val_loss": loss} for r, (c, loss) in val.items()]


def _rule(kind: str, **extra: int) -> SelectionRule:
    """A rule on C-index that may choose any round from 1 (the default minimum is automatic)."""
    return SelectionRule(kind, "c_index", **{"min_round": 1, **extra})


def test_each_rule_ranks_rounds_and_breaks_ties_toward_the_earlier_round() -> None:
    # round 0 (the initial model) is never a candidate; round 4's validation was withheld (empty in metrics.csv)
    rows = _rows({0: (0.99, 0.1), 1: (0.80, 2.0), 2: (0.70, 1.5), 3: (0.80, 1.8), 4: (math.nan, math.nan)})
    assert choose_round(rows, _rule("best-val")) == 3  # tie 0.80: round 3 has lower loss
    assert choose_round(rows, _rule("best-val-loss")) == 2
    assert choose_round(rows, _rule("last")) == 4
    tied = _rows({1: (0.7, 1.0), 2: (0.7, 1.0), 3: (0.6, 1.0)})
    assert choose_round(tied, _rule("best-val")) == 1
    assert choose_round(tied, _rule("best-val-loss")) == 1
    # equal loss: the metric breaks the tie
    assert choose_round(_rows({1: (0.6, 1.0), 2: (0.7, 1.0)}), _rule("best-val-loss")) == 2
    # nothing to rank (round 0 only, or no val columns at all): None, the server then delivers the last round
    assert choose_round(_rows({0: (0.9, 1.0)}), _rule("best-val")) is None
    assert choose_round([{"round": 0}, {"round": 1}], _rule("best-val-loss")) is None


def test_minimum_round_keeps_early_rounds_out_and_is_capped_by_the_run() -> None:
    rows = _rows({1: (0.9, 1.0), 2: (0.6, 2.0), 3: (0.7, 1.9), 4: (0.65, 1.8)})
    assert choose_round(rows, _rule("best-val", min_round=2)) == 3
    assert choose_round(rows, _rule("best-val-loss", min_round=2)) == 4
    assert [auto_min_round(n) for n in (1, 2, 3, 6, 10, 30)] == [1, 2, 2, 2, 3, 10]
    # auto: N = 10 planned rounds -> from round 3, even while only 4 have run
    assert choose_round(rows, SelectionRule("best-val", "c_index", min_round=0), num_rounds=10) == 3
    # a minimum past the last scored round still delivers a scored round: the last one
    assert choose_round(rows, _rule("best-val", min_round=9)) == 4
    # the default (auto): validation C-index tied over the rounds, validation loss rising (lung's 14 validation
    # rows, seed 2) -> round 3, where min-round 1 gave round 1, one averaging step from the initial model
    flat = _rows({r: (0.571, 0.17 + r / 100) for r in range(11)})
    assert choose_round(flat, _rule("best-val"), num_rounds=10) == 1
    assert choose_round(flat, SelectionRule("best-val", "c_index"), num_rounds=10) == 3
    with pytest.raises(ValueError, match="min-round must be >= 0"):
        SelectionRule("best-val", "c_index", min_round=-1)


def test_window_prefers_a_plateau_to_a_single_lucky_round() -> None:
    # round 2 spikes on validation alone; rounds 5-7 are good together
    rows = _rows({1: (0.50, 2.0), 2: (0.90, 1.0), 3: (0.50, 2.0), 4: (0.60, 1.9), 5: (0.75, 1.4),
                  6: (0.80, 1.3), 7: (0.75, 1.4), 8: (0.60, 1.8)})
    assert choose_round(rows, _rule("best-val")) == 2
    assert choose_round(rows, _rule("best-val", window=3)) == 6
    assert choose_round(rows, _rule("best-val-loss")) == 2
    assert choose_round(rows, _rule("best-val-loss", window=3)) == 6
    # the window is truncated at the run's edges: round 3's mean is over rounds 2-3 only
    edge = _rows({1: (0.5, 2.0), 2: (0.6, 2.0), 3: (0.9, 1.0)})
    assert choose_round(edge, _rule("best-val", window=3)) == 3
    with pytest.raises(ValueError, match="odd number"):
        SelectionRule("best-val", "c_index", window=2)
    with pytest.raises(ConfigError, match="model-selection-window must be an odd number"):
        FederationConfig.from_run_config({"model-selection-window": 4})
    with pytest.raises(ConfigError, match="model-selection-min-round must be >= 0"):
        FederationConfig.from_run_config({"model-selection-min-round": -2})


def test_pooled_validation_loss_is_weighted_by_each_sites_validation_size() -> None:
    # round 1: the 40-row site does well, the 5-row site badly; round 2 the other way round.
    # Pooled (n-weighted) loss prefers round 1; an unweighted mean of site losses would prefer round 2.
    site_losses = {1: [(40, 1.0), (5, 3.0)], 2: [(40, 1.4), (5, 1.0)]}
    rows = []
    for server_round, sites in site_losses.items():
        mean = weighted_metric_mean([{"num-examples": 10.0, "num-examples-val": float(n), "val_loss": loss,
                                      "val_c_index": 0.6} for n, loss in sites])
        rows.append({"round": server_round, **{f"eval_{k}": v for k, v in mean.items()}})
    assert rows[0]["eval_val_loss"] == pytest.approx((40 * 1.0 + 5 * 3.0) / 45)
    assert rows[1]["eval_val_loss"] == pytest.approx((40 * 1.4 + 5 * 1.0) / 45)
    assert choose_round(rows, _rule("best-val-loss")) == 1


def test_selection_keys_do_not_block_a_resume() -> None:
    base = FederationConfig.from_run_config({"seed": 3})
    other = FederationConfig.from_run_config({"seed": 3, "model-selection": "last", "model-selection-min-round": 0,
                                              "model-selection-window": 3})
    assert base.config_hash() == other.config_hash()
    # the defaults (docs/benchmarks.md, "Model selection on tiny validation splits"): best-val, auto minimum
    assert (base.model_selection, base.model_selection_min_round, base.model_selection_window) == ("best-val", 0, 1)
    assert (other.model_selection, other.model_selection_min_round, other.model_selection_window) == ("last", 0, 3)


def test_an_old_checkpoints_best_weights_are_delivered_when_that_rounds_file_is_gone(tmp_path: Path) -> None:
    """Checkpoints written before choose_round carry the best round's weights in their ``best`` entry."""
    cfg = FederationConfig.from_run_config({"run-dir": str(tmp_path), "model-selection": "best-val",
                                            "num-server-rounds": 3})
    rows = _rows({0: (0.5, 2.0), 1: (0.6, 1.9), 2: (0.9, 1.0), 3: (0.7, 1.5)})
    last = numpy_to_arrays({"w": np.full(2, 3.0, dtype=np.float32)})
    old_state = {"metric": "c_index", "round": 2, "score": 0.9, "loss": 1.0, "arrays": {"w": np.full(2, 2.0)}}
    legacy = BestRound.from_state(old_state, "c_index")
    arrays, chosen, how = _select_round(tmp_path, cfg, rows, last, legacy)
    assert (chosen, how) == (2, "best-val") and float(arrays["w"].numpy()[0]) == 2.0
    # neither the file nor legacy weights for the chosen round: the last round is delivered, and said so
    arrays, chosen, how = _select_round(tmp_path, cfg, rows, last, BestRound("c_index"))
    assert (chosen, how) == (3, "last") and float(arrays["w"].numpy()[0]) == 3.0


def _write_run(folder: Path, seed: int, val: dict[int, tuple[float, float]], test: dict[int, list[float]]) -> None:
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(json.dumps({"seed": seed, "num-server-rounds": max(val)}))
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["round", "eval_val_c_index", "eval_val_loss"])
        writer.writeheader()
        writer.writerows(_rows(val))
    with (folder / "site_metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["round", "phase", "site", "c_index"])
        writer.writeheader()
        for server_round, values in test.items():
            writer.writerow({"round": server_round, "phase": "train", "site": "A", "c_index": ""})
            writer.writerows({"round": server_round, "phase": "evaluate", "site": f"S{i}", "c_index": v}
                             for i, v in enumerate(values))


def test_offline_comparison_script_replays_every_rule_on_the_same_runs(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("ms_bench", Path(__file__).parents[3] / "benchmarks" /
                                                  "model_selection.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    test = {0: [0.5, 0.5], 1: [0.6, 0.7], 2: [0.7, 0.8], 3: [0.5, 0.6]}
    _write_run(tmp_path / "s0" / "federated", 0, {0: (0.5, 2.0), 1: (0.9, 1.8), 2: (0.7, 1.0), 3: (0.6, 1.2)}, test)
    _write_run(tmp_path / "s1", 1, {0: (0.5, 2.0), 1: (0.6, 1.8), 2: (0.8, 1.1), 3: (0.7, 1.0)}, test)
    out = tmp_path / "results" / "ms.json"
    assert bench.main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out)]) == 0
    results = {r["rule"]: r for r in json.loads(out.read_text())["results"]}
    assert results["last"]["rounds_chosen"] == [3, 3] and results["last"]["mean"] == pytest.approx(0.55)
    assert results["best-val"]["rounds_chosen"] == [1, 2]
    assert results["best-val"]["per_seed"] == pytest.approx([0.65, 0.75])
    assert results["best-val-loss"]["rounds_chosen"] == [2, 3]
    assert results["best-val-loss"]["sd"] == pytest.approx(float(np.std([0.75, 0.55], ddof=1)))
    assert results["best-val min=auto"]["rounds_chosen"] == [2, 2]  # auto minimum for 3 rounds: round 2
    assert results["oracle (chosen on test)"]["rounds_chosen"] == [2, 2]
    # paired with best-val: +0.10 on seed 0, -0.20 on seed 1
    assert results["best-val-loss"]["delta_vs_reference"] == pytest.approx(-0.05)
    assert results["best-val-loss"]["seeds_better_worse"] == [1, 1]
    printed = capsys.readouterr().out
    assert "| unnamed | best-val-loss | c_index 0.650 ± 0.141 | -0.050 ± 0.212 | 1/1 | 2, 3 |" in printed
