"""The round loop's steps (server/round_workflow.py) on a real strategy and an in-process grid of fake sites:
the row a plain train phase produces, RoundFailed, the refusal path, checkpoint order and exact resume."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedfusion.common.config import ConfigError
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.records import ARRAYS_KEY, METRICS_KEY, SITE_KEY, arrays_to_numpy, numpy_to_arrays
from fedfusion.server.model_selection import BestRound
from fedfusion.server.round_workflow import (
    RoundFailed,
    RoundWorkflow,
    TrainPhase,
    checkpoint_path,
    load_checkpoint,
)
from fedfusion.server.strategy import build_strategy
from fedfusion.server.tracking import RunTracking
from tests.dashboard_runs import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime

GROUPS = {"encoders.omics.w": "omics", "fusion.w": "fusion"}
GLOBAL = {key: np.zeros((2, 2), dtype=np.float32) for key in GROUPS}
#: node id -> (site, update value, examples, its own training seconds); site C refuses (privacy budget)
SITES = {1: ("A", 1.0, 10, 2.0), 2: ("B", 3.0, 30, 5.0), 3: ("C", 0.0, 0, 0.0)}
REFUSAL = "study 's': past the budget"


def _site_app(refusing: set[str] = frozenset({"C"}), failing: bool = False):
    """A ClientApp stand-in: train replies an update (value, n, train-seconds) or a refusal or an error;
    evaluate replies a loss of 0.5 per site."""

    def app(msg: Message, context: Context) -> Message:
        site, value, n, seconds = SITES[context.node_id]
        about = ConfigRecord({"site-id": site})
        if msg.metadata.message_type.startswith("evaluate"):
            return Message(RecordDict({METRICS_KEY: MetricRecord({"num-examples": 4, "loss": 0.5}),
                                       SITE_KEY: about}), reply_to=msg)
        if failing:
            return Message(Error(code=0, reason="app bundle not approved"), reply_to=msg)
        if site in refusing:
            return Message(RecordDict({METRICS_KEY: MetricRecord({"epsilon": 6.5}),
                                       SITE_KEY: ConfigRecord({"site-id": site, "refused": REFUSAL})}),
                           reply_to=msg)
        update = {key: np.full((2, 2), value, dtype=np.float32) for key in GROUPS}
        counts = {"num-examples": n, "num-examples-omics": n, "loss": value, "train-seconds": seconds}
        return Message(RecordDict({ARRAYS_KEY: numpy_to_arrays(update), METRICS_KEY: MetricRecord(counts),
                                   SITE_KEY: about}), reply_to=msg)

    return app


class _Recorder:
    """A tracking backend that notes, at each logged round, whether that round's checkpoint already exists."""

    name = "recorder"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.logged: list[tuple[int, bool]] = []

    def start(self, first_round: int) -> None:
        self.first_round = first_round

    def log_round(self, step: int, scalars: Any) -> None:
        self.logged.append((step, checkpoint_path(self.run_dir, step).is_file()))

    def close(self, failed: bool) -> None:
        pass


def _workflow(tmp_path: Path, app: Any, *, resume: bool = False, seed: int = 1,
              on_round: Any = None) -> tuple[RoundWorkflow, _Recorder]:
    cfg = FederationConfig.from_run_config({"num-server-rounds": 3, "min-sites": 2, "seed": seed,
                                            "run-dir": str(tmp_path), "round-timeout": 5.0, "resume": resume})
    recorder = _Recorder(tmp_path)
    grid = InProcessGrid(app, {node: {} for node in SITES})
    return RoundWorkflow(grid, build_strategy("fedavg", GROUPS, min_sites=2), cfg,
                         RunTracking(cfg.raw, trackers=[recorder]), on_round), recorder


def test_a_plain_train_phase_averages_the_updates_and_its_row_counts_sites_and_overhead(tmp_path: Path,
                                                                                        caplog) -> None:
    flow, _ = _workflow(tmp_path, _site_app())
    with caplog.at_level(logging.WARNING, logger="fedfusion.server"):
        phase = flow.train_phase(1, numpy_to_arrays(GLOBAL))

    assert phase.refused == [{"round": 1, "site": "C", "reason": REFUSAL, "epsilon": 6.5}]
    assert f"round 1: site C refused to train: {REFUSAL}" in caplog.text
    assert len(phase.replies) == 2 and phase.secure_row is None and not phase.every_site_refused
    new = arrays_to_numpy(flow.next_global_model(1, phase, numpy_to_arrays(GLOBAL)))
    assert np.allclose(new["fusion.w"], 2.5)  # (1.0 * 10 + 3.0 * 30) / 40: weighted by examples
    row = flow.round_row(1, phase)
    assert list(row)[:5] == ["round", "sites_trained", "train_phase_seconds", "slowest_site_train_seconds",
                             "round_overhead_seconds"]
    assert (row["round"], row["sites_trained"], row["slowest_site_train_seconds"], row["sites_refused"]) == (
        1, 2, 5.0, 1)
    assert row["round_overhead_seconds"] == pytest.approx(phase.seconds - 5.0)
    assert row["train_loss"] == pytest.approx(2.5)
    assert "client_dp_epsilon" not in row and not any(k.startswith("secagg_") for k in row)


def test_a_plain_round_where_every_site_failed_raises_round_failed_naming_resume(tmp_path: Path) -> None:
    flow, _ = _workflow(tmp_path, _site_app(failing=True))
    arrays = numpy_to_arrays(GLOBAL)
    phase = flow.train_phase(4, arrays)

    with pytest.raises(RoundFailed) as failed:
        flow.next_global_model(4, phase, arrays)
    assert str(failed.value) == (
        "round 4: no site returned a usable update (3 replies, 3 rejected); the global model is unchanged and the "
        "last checkpoint is round 3. Check the sites' logs (e.g. an app bundle they have not approved), then "
        "`fedfusion run ... --resume`")


def test_refusals_or_a_failed_secure_round_keep_the_model_instead_of_failing(tmp_path: Path, caplog) -> None:
    flow, _ = _workflow(tmp_path, _site_app(refusing={"A", "B", "C"}))
    arrays = numpy_to_arrays(GLOBAL)
    refused = flow.train_phase(2, arrays)
    secure = TrainPhase(replies=[1, 2, 3], arrays=None, metrics=None, refused=[], seconds=1.0,
                        secure_row={"secagg_failed": 1})

    with caplog.at_level(logging.WARNING, logger="fedfusion.server"):
        assert flow.next_global_model(2, refused, arrays) is arrays
        assert flow.next_global_model(2, secure, arrays) is arrays
    assert refused.every_site_refused and len(refused.refused) == 3
    assert not secure.every_site_refused
    assert caplog.text.count("no usable update; the global model is unchanged") == 2
    assert flow.round_row(2, secure)["secagg_failed"] == 1


def test_close_round_checkpoints_before_tracking_and_callback_and_resume_restores_the_state(tmp_path: Path) -> None:
    seen: list[tuple[int, bool]] = []
    flow, recorder = _workflow(tmp_path, _site_app(),
                               on_round=lambda row: seen.append((row["round"], checkpoint_path(
                                   tmp_path, row["round"]).is_file())))
    run = flow.start_or_resume(numpy_to_arrays(GLOBAL), BestRound("loss"))
    flow.close_round(run, {"round": 0, **flow.evaluate(0, run.arrays)})
    phase = flow.train_phase(1, run.arrays)
    run.refusals += phase.refused
    run.arrays = flow.next_global_model(1, phase, run.arrays)
    flow.close_round(run, flow.round_row(1, phase))

    assert (tmp_path / "run_config.json").is_file() and recorder.first_round == 0
    assert run.rounds[0] == {"round": 0, "eval_loss": 0.5}  # Flower's default aggregation drops the weight
    assert seen == recorder.logged == [(0, False), (1, True)]  # round 0 has no checkpoint; round 1 first saved
    saved = load_checkpoint(checkpoint_path(tmp_path, 1))
    assert saved["round"] == 1 and saved["rounds"] == run.rounds and saved["refusals"] == run.refusals

    resumed_flow, resumed_recorder = _workflow(tmp_path, _site_app(), resume=True)
    resumed = resumed_flow.start_or_resume(numpy_to_arrays(GLOBAL), BestRound("loss"))
    assert (resumed.start, resumed.rounds, resumed.refusals, resumed_recorder.first_round) == (
        2, run.rounds, run.refusals, 2)
    assert np.array_equal(arrays_to_numpy(resumed.arrays)["fusion.w"], arrays_to_numpy(run.arrays)["fusion.w"])
    assert resumed_flow.strategy.site_metrics == flow.strategy.site_metrics

    other, _ = _workflow(tmp_path, _site_app(), resume=True, seed=2)
    with pytest.raises(ConfigError, match="written with another run config .* resume with the same settings"):
        other.start_or_resume(numpy_to_arrays(GLOBAL), BestRound("loss"))


def test_deliver_writes_the_last_rounds_model_when_no_rule_applies(tmp_path: Path) -> None:
    from tests.dashboard_runs import toy_schema

    flow, _ = _workflow(tmp_path, _site_app())
    run = flow.start_or_resume(numpy_to_arrays({k: np.full((2, 2), 7.0, dtype=np.float32) for k in GROUPS}),
                               BestRound("loss"))
    run.rounds = [{"round": 0}, {"round": 1}]

    arrays, selected, how = flow.deliver(toy_schema(), run)

    saved = torch.load(tmp_path / "model.pt", weights_only=False)
    assert (selected, how, saved["selected_round"], saved["selection"]) == (1, "last", 1, "last")
    assert torch.equal(saved["state_dict"]["fusion.w"], torch.full((2, 2), 7.0))
    assert arrays is run.arrays
