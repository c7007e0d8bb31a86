"""The steps of the coordinator's round loop (:func:`fedfusion.server.federation.run_federation`).

Flower's ``Strategy.start`` runs rounds 1..N in memory; a coordinator that crashes in round 7 of 20
would lose everything. The loop therefore calls the same public strategy hooks itself
(``configure_train``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``), one named
step each, and closes every round with a checkpoint:

- :meth:`RoundWorkflow.start_or_resume`: a fresh run, or the state of the newest checkpoint;
- :meth:`RoundWorkflow.train_phase`: plain (one message exchange) or secure (the server only ever holds
  sums, server/secure_aggregation.py), giving a :class:`TrainPhase`; sites' refusals are split off;
- :meth:`RoundWorkflow.next_global_model`: the new global model, or :class:`RoundFailed`;
- :meth:`RoundWorkflow.round_row`: the round's metrics row (overhead, secure status, client-level ε);
- :meth:`RoundWorkflow.evaluate`, :meth:`RoundWorkflow.close_round` (checkpoint, tracking, callback);
- :meth:`RoundWorkflow.deliver`: the round chosen by ``model-selection`` written to ``model.pt``.

Nothing here touches Flower's private methods or attributes (tests/unit/test_flower_canaries.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedfusion.common.config import ConfigError, Schema
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.records import arrays_to_numpy, numpy_to_arrays
from fedfusion.server.messaging import send_and_collect
from fedfusion.server.model_selection import BestRound, SelectionRule, choose_round
from fedfusion.server.privacy import ClientLevelDP, split_refusals
from fedfusion.server.run_folders import load_checkpoint_file
from fedfusion.server.secure_aggregation import run_secure_round
from fedfusion.server.strategy import ModalityAwareFedAvg
from fedfusion.server.tracking import RunTracking

log = logging.getLogger("fedfusion.server")

CHECKPOINT_DIR = "checkpoints"
MODEL_FILENAME = "model.pt"
RUN_CONFIG_FILENAME = "run_config.json"


class RoundFailed(RuntimeError):
    """A round in which no site returned a usable update; the run stops before checkpointing it."""


# --- checkpoint files ------------------------------------------------------------------------------------------


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"round-{server_round:04d}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINT_DIR).glob("round-*.pt"))
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, strategy: ModalityAwareFedAvg,
                    rounds: list[dict[str, Any]], cfg: FederationConfig,
                    refusals: list[dict[str, Any]] | None = None, best: BestRound | None = None) -> Path:
    """Write atomically (temp file + rename) so a crash mid-write never leaves a torn checkpoint."""
    path = checkpoint_path(run_dir, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"round": server_round, "arrays": arrays_to_numpy(arrays), "strategy": strategy.state(),
               "rounds": rounds, "config_hash": cfg.config_hash(), "run_config": dict(cfg.raw),
               "refusals": list(refusals or []), "best": best.state() if best is not None else None}
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint for resume: loaded with ``weights_only=True`` (see :func:`load_checkpoint_file`)."""
    return load_checkpoint_file(path)


# --- what the loop carries from round to round -----------------------------------------------------------------


@dataclass
class RunState:
    """What the loop carries between rounds: exactly what a checkpoint restores (plus the strategy's own
    state, which lives in the strategy), so a resumed run continues as an uninterrupted one would."""

    arrays: ArrayRecord
    best: BestRound
    """Filled only from a checkpoint written before choose_round (its best round's weights), and passed on
    in later checkpoints: the fallback when that round's own checkpoint file is gone (:func:`select_round`)."""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    start: int = 1
    """The first round this run trains (1, or the checkpoint's round + 1)."""
    ended_early: str = ""


@dataclass
class TrainPhase:
    """What one round's train phase gives the loop, plain or secure alike.

    ``replies`` are the reply Messages that were not refusals (plain) or the node ids that took part in
    the protocol (secure); only whether any came, and how many, matters afterwards. ``arrays`` is the
    aggregated global model (None: no usable update); ``metrics`` the aggregated train metrics (None:
    none); ``secure_row`` the ``secagg_*`` status of a secure round (None: a plain round); ``seconds``
    the phase's wall time, from sending the train messages to the last reply (before aggregation).
    """

    replies: list[Any]
    arrays: ArrayRecord | None
    metrics: Mapping[str, Any] | None
    refused: list[dict[str, Any]]
    seconds: float
    secure_row: dict[str, Any] | None = None

    @property
    def every_site_refused(self) -> bool:
        """Every site that answered refused (privacy policy or ε budget): no later round could train."""
        return bool(self.refused) and not self.replies


def _log_refusals(server_round: int, refused: list[dict[str, Any]]) -> None:
    for refusal in refused:
        log.warning("round %d: site %s refused to train: %s", server_round, refusal["site"], refusal["reason"])


# --- the steps -------------------------------------------------------------------------------------------------


@dataclass
class RoundWorkflow:
    """The steps of one run, over the grid and strategy built by the loop's set-up.

    ``grid`` is already wrapped (replies recorded, attributed to roster sites); ``strategy`` may be the
    client-level DP wrapper (:class:`~fedfusion.server.privacy.ClientLevelDP`). ``on_round`` sees each
    round's row after its checkpoint and tracking.
    """

    grid: Grid
    strategy: ModalityAwareFedAvg
    cfg: FederationConfig
    tracking: RunTracking
    on_round: Callable[[dict[str, Any]], None] | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    def start_or_resume(self, arrays: ArrayRecord, best: BestRound) -> RunState:
        """A fresh run from ``arrays``, or with ``resume`` the state of the newest checkpoint.

        Node sampling is seeded by (seed, round) in the loop and sites seed their training by (seed, round,
        site), so a resumed run ends with the same weights as an uninterrupted one, provided the run config
        is the same: a checkpoint written under another config hash is refused.
        """
        run = RunState(arrays=arrays, best=best)
        found = latest_checkpoint(self.run_dir) if self.cfg.resume else None
        if found is not None:
            state = load_checkpoint(found)
            if state["config_hash"] != self.cfg.config_hash():
                raise ConfigError(f"{found}: this checkpoint was written with another run config "
                                  f"(hash {state['config_hash']} vs {self.cfg.config_hash()}); resume with the "
                                  "same settings")
            run.arrays = numpy_to_arrays(state["arrays"])
            self.strategy.load_state(state["strategy"])
            run.rounds = list(state["rounds"])
            run.refusals = list(state.get("refusals", []))
            run.best = BestRound.from_state(state.get("best"), best.metric)
            run.start = int(state["round"]) + 1
            log.info("resuming %s from round %d", self.run_dir, run.start)
        elif self.cfg.resume:
            log.info("no checkpoint in %s: starting from round 1", self.run_dir)
        (self.run_dir / RUN_CONFIG_FILENAME).write_text(json.dumps(dict(self.cfg.raw), indent=2, default=str) + "\n")
        self.tracking.start(first_round=0 if run.start == 1 else run.start)  # a resume logs only the rounds it runs
        return run

    def train_phase(self, server_round: int, arrays: ArrayRecord) -> TrainPhase:
        """The round's train phase as configured (``secure-aggregation``)."""
        if self.cfg.secure.enabled:
            return self.train_phase_secure(server_round, arrays)
        return self.train_phase_plain(server_round, arrays)

    def train_phase_plain(self, server_round: int, arrays: ArrayRecord) -> TrainPhase:
        """One exchange: the strategy samples and configures, the sites reply, refusals are split off before
        ``aggregate_train`` (a refusal carries no update; the round goes on with the others)."""
        began = time.monotonic()
        replies = send_and_collect(self.grid, self.strategy.configure_train(server_round, arrays, ConfigRecord(),
                                                                            self.grid),
                                   timeout=self.cfg.round_timeout)
        seconds = time.monotonic() - began
        refused, replies = split_refusals(server_round, replies)
        _log_refusals(server_round, refused)
        new_arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        return TrainPhase(replies=replies, arrays=new_arrays, metrics=metrics, refused=refused, seconds=seconds)

    def train_phase_secure(self, server_round: int, arrays: ArrayRecord) -> TrainPhase:
        """Four message exchanges; the server only ever holds sums (server/secure_aggregation.py)."""
        began = time.monotonic()
        secure = run_secure_round(self.grid, self.strategy, server_round, arrays, self.cfg)
        seconds = time.monotonic() - began
        _log_refusals(server_round, secure.refusals)
        return TrainPhase(replies=secure.participants, arrays=secure.arrays, metrics=secure.metrics or None,
                          refused=secure.refusals, seconds=seconds, secure_row=secure.row)

    def next_global_model(self, server_round: int, phase: TrainPhase, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregated model, or ``arrays`` unchanged when the round had no usable update.

        A plain round in which every site failed (crashed, refused the app bundle, sent an unusable update)
        raises :class:`RoundFailed`: recording it as done would lose it silently, so the run stops before
        its checkpoint and ``--resume`` retries it. A round with refusals (privacy) or a secure round that
        failed cleanly (too many dropouts) keeps the model and goes on.
        """
        if phase.arrays is not None:
            return phase.arrays
        if phase.secure_row is None and not phase.refused:
            rejected = sum(1 for r in self.strategy.rejected if r.get("round") == server_round)
            raise RoundFailed(
                f"round {server_round}: no site returned a usable update ({len(phase.replies)} replies, "
                f"{rejected} rejected); the global "
                f"model is unchanged and the last checkpoint is round {server_round - 1}. Check the sites' logs "
                "(e.g. an app bundle they have not approved), then `fedfusion run ... --resume`")
        log.warning("round %d: no usable update; the global model is unchanged", server_round)
        return arrays

    def round_row(self, server_round: int, phase: TrainPhase) -> dict[str, Any]:
        """The round's metrics row before evaluation (metrics.csv, reports, tracking; keys in this order).

        ``round_overhead_seconds`` is what federation costs on top of local work: the train phase's wall
        time minus the slowest site's own training time.
        """
        trained = [m for m in self.strategy.site_metrics if m["round"] == server_round and m["phase"] == "train"]
        slowest = max((float(m.get("train-seconds", 0.0)) for m in trained), default=0.0)
        row: dict[str, Any] = {"round": server_round, "sites_trained": len(trained),
                               "train_phase_seconds": phase.seconds, "slowest_site_train_seconds": slowest,
                               "round_overhead_seconds": phase.seconds - slowest}
        if phase.metrics is not None:
            row.update({f"train_{k}": float(v) for k, v in phase.metrics.items()})
        row["sites_refused"] = len(phase.refused)
        if phase.secure_row is not None:
            row.update(phase.secure_row)
        if isinstance(self.strategy, ClientLevelDP):
            row["client_dp_epsilon"] = self.strategy.epsilon()
        return row

    def end_early(self, server_round: int) -> str:
        """Why the run ends at ``server_round`` (every site refused): logged, and kept in the result so the
        deployed ServerApp can fail the run after its report (``RunIncomplete``)."""
        reason = (f"round {server_round}: every site that answered refused to train (privacy policy or "
                  "budget); no later round could train, so the run ends here")
        log.warning(reason)
        return reason

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        """Federated evaluation of ``arrays`` (round 0: the initial model, so reports show what federation
        added), as ``eval_*`` row entries."""
        replies = send_and_collect(self.grid, self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(),
                                                                               self.grid),
                                   timeout=self.cfg.round_timeout)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        return {} if metrics is None else {f"eval_{k}": float(v) for k, v in metrics.items()}

    def close_round(self, run: RunState, row: dict[str, Any]) -> None:
        """Record a finished round: its row joins the run, its checkpoint is written (round 0 has none: a
        resume without checkpoint starts over from round 0), then tracking and ``on_round`` see it.
        Tracking comes after the checkpoint, so a resume never logs a round twice."""
        run.rounds.append(row)
        server_round = int(row["round"])
        if server_round > 0:
            save_checkpoint(self.run_dir, server_round, run.arrays, self.strategy, run.rounds, self.cfg,
                            run.refusals, run.best)
        self.tracking.log_round(row, self.strategy.site_metrics)
        if self.on_round:
            self.on_round(row)

    def deliver(self, schema: Schema, run: RunState) -> tuple[ArrayRecord, int, str]:
        """Write ``model.pt`` with the global model of the round ``model-selection`` chooses; return that
        model, its round and the rule that chose it."""
        arrays, selected_round, selection = select_round(self.run_dir, self.cfg, run.rounds, run.arrays, run.best)
        log.info("delivering the global model of round %d (%s)", selected_round, selection)
        torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in arrays_to_numpy(arrays).items()},
                    "schema": schema.to_dict(), "run_config": dict(self.cfg.raw), "selected_round": selected_round,
                    "selection": selection}, self.run_dir / MODEL_FILENAME)
        return arrays, selected_round, selection


def select_round(run_dir: Path, cfg: FederationConfig, rounds: list[dict[str, Any]], arrays: ArrayRecord,
                 legacy: BestRound) -> tuple[ArrayRecord, int, str]:
    """The delivered model, its round and rule (server/model_selection.py), chosen from the round rows alone
    (so a resume chooses as an uninterrupted run). An earlier round's weights come from its checkpoint, or
    from ``legacy`` (a checkpoint written before choose_round carried the best round's weights)."""
    last = int(rounds[-1]["round"])
    rule = SelectionRule(cfg.model_selection, legacy.metric, cfg.model_selection_min_round,
                         cfg.model_selection_window)
    chosen = choose_round(rounds, rule, cfg.num_rounds)
    if chosen is None:
        if rule.kind != "last":
            log.warning("no site reported a validation %s/loss (no 'val' rows?): delivering the last round's model",
                        legacy.metric)
        return arrays, last, "last"
    if chosen == last:
        return arrays, last, rule.kind
    path = checkpoint_path(run_dir, chosen)
    saved = load_checkpoint(path) if path.is_file() else None
    if saved is not None and saved["round"] == chosen and saved["config_hash"] == cfg.config_hash():
        return numpy_to_arrays(saved["arrays"]), chosen, rule.kind
    if legacy.round == chosen and legacy.arrays is not None:
        return numpy_to_arrays(legacy.arrays), chosen, rule.kind
    log.warning("%s chose round %d but %s is gone: delivering the last round's model", rule.label, chosen, path)
    return arrays, last, "last"
