"""The coordinator's round loop: Flower's ``Strategy.start`` plus checkpoints and exact resume.

``Strategy.start`` runs rounds 1..N in memory; a coordinator that crashes in round 7 of 20 would
lose everything. This loop calls the same strategy hooks (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) and after every round writes a checkpoint
(global weights, strategy state, round, config hash) atomically. ``resume`` continues from the
newest checkpoint; node sampling is seeded by (seed, round) and sites seed their training by
(seed, round, site), so a resumed run ends with the same weights as an uninterrupted one.

Round 0 evaluates the initial model at every site, so reports show what federation added.

Privacy: a site may refuse a round (its privacy policy or ε budget does not allow it); refusals are
recorded per site and round and the round goes on with the others. When every site that answered
refused, no further round can train: the run ends cleanly there, with its checkpoint and report.
With ``dp-mode = "client"`` the strategy is wrapped in Flower's client-side fixed-clipping DP
(:class:`~fedfusion.server.privacy.ClientLevelDP`) and each round row carries the client-level ε.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from fedfusion.common.config import ConfigError, load_schema
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.models import create_model
from fedfusion.common.personalization import private_keys
from fedfusion.common.records import (
    EPSILON_KEY,
    NUM_EXAMPLES,
    VAL_COUNT_KEY,
    VAL_PREFIX,
    arrays_to_numpy,
    model_to_arrays,
    numpy_to_arrays,
)
from fedfusion.common.training import primary_metric, seed_everything
from fedfusion.server.messaging import REPLIES_FILENAME, RecordingGrid, ReplyLog, send_and_collect
from fedfusion.server.model_selection import BestRound, SelectionRule, choose_round
from fedfusion.server.privacy import ClientLevelDP, split_refusals
from fedfusion.server.reply_attribution import attributing
from fedfusion.server.run_folders import load_checkpoint_file
from fedfusion.server.run_lock import hold_run_folder
from fedfusion.server.secure_aggregation import check_secure_compatible, run_secure_round
from fedfusion.server.strategy import ModalityAwareFedAvg, build_strategy
from fedfusion.server.tracking import RunTracking

log = logging.getLogger("fedfusion.server")

CHECKPOINT_DIR = "checkpoints"


@dataclass
class FederationResult:
    arrays: ArrayRecord
    rounds: list[dict[str, Any]] = field(default_factory=list)
    site_metrics: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    refusals: list[dict[str, Any]] = field(default_factory=list)
    ended_early: str = ""
    selected_round: int = 0
    """The round whose global model ``arrays`` and ``model.pt`` hold (``model-selection``)."""
    selection: str = "last"
    """How it was chosen: the ``model-selection`` rule (``best-val-loss``, ``best-val``) or ``last``."""


class RoundFailed(RuntimeError):
    """A round in which no site returned a usable update; the run stops before checkpointing it."""


class RunIncomplete(RuntimeError):
    """The run ended before its last round because every site refused one (``FederationResult.ended_early``).

    Raised by the deployed ServerApp *after* the run folder's report is written, so Flower records the
    run as ``finished:failed`` and ``fedfusion run`` exits non-zero: a run that trained fewer rounds
    than asked did not do what the coordinator asked, however cleanly it stopped.
    """


COUNT_KEYS = ("n", "events")
#: Reported as the largest value over sites: the most privacy any site has spent.
MAX_KEYS = (EPSILON_KEY,)


def is_count(key: str) -> bool:
    """Counts (examples, events) are summed, not averaged: a mean of site sizes means nothing."""
    return key in COUNT_KEYS or key.startswith(NUM_EXAMPLES)


def weighted_metric_mean(records: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric weighted by ``num-examples`` over the sites that reported it (a site may
    lack a metric, e.g. C-index with no comparable pair); counts are summed instead. Validation
    metrics (``val_*``) are weighted by each site's validation size."""
    out: dict[str, float] = {}
    for key in sorted({k for r in records for k in r if is_count(k)}):
        out[key] = float(sum(float(r.get(key, 0.0)) for r in records))
    for key in sorted({k for r in records for k in r if k in MAX_KEYS}):
        out[key] = max(float(r[key]) for r in records if key in r)
    keys = {k for r in records for k in r if not is_count(k) and k not in MAX_KEYS}
    for key in sorted(keys):
        weight = VAL_COUNT_KEY if key.startswith(VAL_PREFIX) else NUM_EXAMPLES  # val_ metrics: by val size
        pairs = [(float(r[weight]), float(r[key])) for r in records if key in r and weight in r]
        total = sum(w for w, _ in pairs)
        if total > 0:
            out[key] = sum(w * v for w, v in pairs) / total
    return out



def _metric_aggregator(records: list, weight_key: str) -> MetricRecord:
    """Flower-signature wrapper of :func:`weighted_metric_mean` for evaluate replies."""
    flat = [dict(next(iter(r.metric_records.values()))) for r in records]
    return MetricRecord(weighted_metric_mean(flat))


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


def run_federation(grid: Grid, cfg: FederationConfig,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> FederationResult:
    """Run (or resume) the configured rounds against the sites reachable through ``grid``.

    The run folder's writer lock is held throughout: a resumed run waits for (or refuses next to) an
    orphaned ServerApp of a crashed coordinator instead of writing the same checkpoints beside it.
    """
    if not cfg.schema:
        raise ConfigError("run config: 'schema' must name the federation schema JSON on the coordinator")
    # tracking (run config `tracking`, server/tracking.py): closed also when a round raises
    with hold_run_folder(Path(cfg.run_dir)), RunTracking(cfg.raw) as tracking:
        return _run_rounds(grid, cfg, on_round, tracking)


def _run_rounds(grid: Grid, cfg: FederationConfig,
                on_round: Callable[[dict[str, Any]], None] | None, tracking: RunTracking) -> FederationResult:
    schema = load_schema(cfg.schema)
    run_dir = Path(cfg.run_dir)
    grid = RecordingGrid(grid, ReplyLog(run_dir / REPLIES_FILENAME))  # every reply received: replies.jsonl
    grid = attributing(grid, dict(cfg.raw))  # run config `roster`: replies must be signed by roster sites
    seed_everything(cfg.seed)
    model = create_model(schema, cfg.model)
    groups = {name: group for group, names in model.parameter_groups().items() for name in names}
    strategy = build_strategy(cfg.strategy, groups, min_sites=cfg.min_sites, fraction_train=cfg.fraction_train,
                              fraction_evaluate=cfg.fraction_evaluate, proximal_mu=cfg.proximal_mu,
                              server_lr=cfg.server_lr, evaluate_metrics_aggr_fn=_metric_aggregator,
                              train_metrics_aggr_fn=_metric_aggregator,
                              private_keys=private_keys(model.state_dict(), cfg.personal.private_parts))
    check_secure_compatible(cfg)
    if cfg.privacy.mode == "client":
        if cfg.strategy == "fedadam":
            raise ConfigError("run config: dp-mode = \"client\" needs strategy fedavg or fedprox (FedAdam's server "
                              "optimizer would act on the update before the noise is added)")
        strategy = ClientLevelDP(strategy, cfg.privacy.client_noise_multiplier, cfg.privacy.client_clipping_norm,
                                 delta=cfg.privacy.target_delta or 1e-5)
    arrays = model_to_arrays(model)
    refusals: list[dict[str, Any]] = []
    ended_early = ""
    rounds: list[dict[str, Any]] = []
    # Filled only from a checkpoint written before choose_round (its best round's weights), and passed on
    # in later checkpoints: the fallback when that round's own checkpoint file is gone (_select_round).
    best = BestRound(primary_metric(schema))
    start = 1
    found = latest_checkpoint(run_dir) if cfg.resume else None
    if found is not None:
        state = load_checkpoint(found)
        if state["config_hash"] != cfg.config_hash():
            raise ConfigError(f"{found}: this checkpoint was written with another run config "
                              f"(hash {state['config_hash']} vs {cfg.config_hash()}); resume with the same settings")
        arrays = numpy_to_arrays(state["arrays"])
        strategy.load_state(state["strategy"])
        rounds = list(state["rounds"])
        refusals = list(state.get("refusals", []))
        best = BestRound.from_state(state.get("best"), best.metric)
        start = int(state["round"]) + 1
        log.info("resuming %s from round %d", run_dir, start)
    elif cfg.resume:
        log.info("no checkpoint in %s: starting from round 1", run_dir)
    (run_dir / "run_config.json").write_text(json.dumps(dict(cfg.raw), indent=2, default=str) + "\n")
    tracking.start(first_round=0 if start == 1 else start)  # a resume logs only the rounds it runs

    if start == 1:
        row = {"round": 0, **_evaluate(grid, strategy, 0, arrays, cfg)}
        rounds.append(row)
        tracking.log_round(row, strategy.site_metrics)
        if on_round:
            on_round(row)
    for server_round in range(start, cfg.num_rounds + 1):
        began = time.monotonic()
        random.seed(cfg.seed * 7_919 + server_round)  # Flower samples nodes with `random`
        secure = None
        if cfg.secure.enabled:  # four message exchanges; the server only ever holds sums (secure_aggregation.py)
            secure = run_secure_round(grid, strategy, server_round, arrays, cfg)
            replies, refused, train_phase = secure.participants, secure.refusals, time.monotonic() - began
        else:
            replies = send_and_collect(grid,
                strategy.configure_train(server_round, arrays, ConfigRecord(), grid), timeout=cfg.round_timeout)
            train_phase = time.monotonic() - began
            refused, replies = split_refusals(server_round, replies)
        for refusal in refused:
            log.warning("round %d: site %s refused to train: %s", server_round, refusal["site"], refusal["reason"])
        refusals += refused
        new_arrays, train_metrics = ((secure.arrays, secure.metrics or None) if secure is not None
                                     else strategy.aggregate_train(server_round, replies))
        if new_arrays is not None:
            arrays = new_arrays
        elif secure is None and not refused:
            # Every site failed (crashed, refused the app bundle, sent an unusable update): recording this
            # round as done would lose it silently. Stop before its checkpoint, so --resume retries it.
            raise RoundFailed(
                f"round {server_round}: no site returned a usable update ({len(replies)} replies, "
                f"{sum(1 for r in strategy.rejected if r.get('round') == server_round)} rejected); the global "
                f"model is unchanged and the last checkpoint is round {server_round - 1}. Check the sites' logs "
                "(e.g. an app bundle they have not approved), then `fedfusion run ... --resume`")
        else:
            log.warning("round %d: no usable update; the global model is unchanged", server_round)
        trained = [m for m in strategy.site_metrics if m["round"] == server_round and m["phase"] == "train"]
        slowest = max((float(m.get("train-seconds", 0.0)) for m in trained), default=0.0)
        # What federation costs on top of local work: the train phase's wall time minus the slowest site.
        row = {"round": server_round, "sites_trained": len(trained), "train_phase_seconds": train_phase,
               "slowest_site_train_seconds": slowest, "round_overhead_seconds": train_phase - slowest}
        if train_metrics is not None:
            row.update({f"train_{k}": float(v) for k, v in train_metrics.items()})
        row["sites_refused"] = len(refused)
        if secure is not None:
            row.update(secure.row)
        if isinstance(strategy, ClientLevelDP):
            row["client_dp_epsilon"] = strategy.epsilon()
        if refused and not replies:
            ended_early = (f"round {server_round}: every site that answered refused to train (privacy policy or "
                           "budget); no later round could train, so the run ends here")
            log.warning(ended_early)
            row["seconds"] = time.monotonic() - began
            rounds.append(row)
            save_checkpoint(run_dir, server_round, arrays, strategy, rounds, cfg, refusals, best)
            tracking.log_round(row, strategy.site_metrics)
            if on_round:
                on_round(row)
            break
        row.update(_evaluate(grid, strategy, server_round, arrays, cfg))
        row["seconds"] = time.monotonic() - began
        rounds.append(row)
        save_checkpoint(run_dir, server_round, arrays, strategy, rounds, cfg, refusals, best)
        tracking.log_round(row, strategy.site_metrics)  # after the checkpoint: a resume never logs it twice
        if on_round:
            on_round(row)
    arrays, selected_round, selection = _select_round(run_dir, cfg, rounds, arrays, best)
    log.info("delivering the global model of round %d (%s)", selected_round, selection)
    final = run_dir / "model.pt"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in arrays_to_numpy(arrays).items()},
                "schema": schema.to_dict(), "run_config": dict(cfg.raw), "selected_round": selected_round,
                "selection": selection}, final)
    return FederationResult(arrays=arrays, rounds=rounds, site_metrics=strategy.site_metrics,
                            rejected=strategy.rejected, run_dir=run_dir, refusals=refusals, ended_early=ended_early,
                            selected_round=selected_round, selection=selection)


def _select_round(run_dir: Path, cfg: FederationConfig, rounds: list[dict[str, Any]], arrays: ArrayRecord,
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


def _evaluate(grid: Grid, strategy: ModalityAwareFedAvg, server_round: int, arrays: ArrayRecord,
              cfg: FederationConfig) -> dict[str, float]:
    replies = send_and_collect(grid,
        strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout=cfg.round_timeout)
    metrics = strategy.aggregate_evaluate(server_round, replies)
    return {} if metrics is None else {f"eval_{k}": float(v) for k, v in metrics.items()}
