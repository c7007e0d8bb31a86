"""The coordinator's round loop: Flower's ``Strategy.start`` plus checkpoints and exact resume.

``Strategy.start`` runs rounds 1..N in memory; a coordinator that crashes in round 7 of 20 would
lose everything. This loop calls the same strategy hooks (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) and after every round writes a checkpoint
(global weights, strategy state, round, config hash) atomically. ``resume`` continues from the
newest checkpoint; node sampling is seeded by (seed, round) and sites seed their training by
(seed, round, site), so a resumed run ends with the same weights as an uninterrupted one.
Each step of a round (train phase plain or secure, refusals, the row, evaluation, checkpoint, the
delivered model) is one named step of :class:`~fedfusion.server.round_workflow.RoundWorkflow`;
this module is the set-up, the loop itself and the run's result.

Round 0 evaluates the initial model at every site, so reports show what federation added.

Privacy: a site may refuse a round (its privacy policy or ε budget does not allow it); refusals are
recorded per site and round and the round goes on with the others. When every site that answered
refused, no further round can train: the run ends cleanly there, with its checkpoint and report.
With ``dp-mode = "client"`` the strategy is wrapped in Flower's client-side fixed-clipping DP
(:class:`~fedfusion.server.privacy.ClientLevelDP`) and each round row carries the client-level ε.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedfusion.common.config import ConfigError, Schema, load_schema
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.models import create_model
from fedfusion.common.personalization import private_keys
from fedfusion.common.records import EPSILON_KEY, NUM_EXAMPLES, VAL_COUNT_KEY, VAL_PREFIX, model_to_arrays
from fedfusion.common.training import primary_metric, seed_everything
from fedfusion.server.messaging import REPLIES_FILENAME, RecordingGrid, ReplyLog
from fedfusion.server.model_selection import BestRound
from fedfusion.server.privacy import ClientLevelDP
from fedfusion.server.reply_attribution import attributing
from fedfusion.server.round_workflow import (
    CHECKPOINT_DIR,
    RoundFailed,
    RoundWorkflow,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedfusion.server.round_workflow import select_round as _select_round
from fedfusion.server.run_lock import hold_run_folder
from fedfusion.server.secure_aggregation import check_secure_compatible
from fedfusion.server.strategy import ModalityAwareFedAvg, build_strategy
from fedfusion.server.tracking import RunTracking

log = logging.getLogger("fedfusion.server")

#: Re-exported: callers and tests import the checkpoint helpers and RoundFailed from here.
__all__ = ["CHECKPOINT_DIR", "COUNT_KEYS", "MAX_KEYS", "FederationResult", "RoundFailed", "RunIncomplete",
           "_select_round", "checkpoint_path", "is_count", "latest_checkpoint", "load_checkpoint", "run_federation",
           "save_checkpoint", "weighted_metric_mean"]


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


def _set_up(grid: Grid, cfg: FederationConfig) -> tuple[Schema, Grid, ModalityAwareFedAvg, ArrayRecord]:
    """The schema, the wrapped grid, the strategy (client-level DP wrapped around it with ``dp-mode =
    "client"``) and the initial global model; refuses settings that cannot run before anything is sent."""
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
    return schema, grid, strategy, model_to_arrays(model)


def _run_rounds(grid: Grid, cfg: FederationConfig,
                on_round: Callable[[dict[str, Any]], None] | None, tracking: RunTracking) -> FederationResult:
    """The loop: each round trains (a plain or secure train phase), records its sites' refusals, takes the
    new global model (or stops with :class:`RoundFailed` before its checkpoint, so ``--resume`` retries
    it), evaluates and checkpoints; a round in which every site refused ends the run cleanly."""
    schema, grid, strategy, arrays = _set_up(grid, cfg)
    flow = RoundWorkflow(grid, strategy, cfg, tracking, on_round)
    run = flow.start_or_resume(arrays, BestRound(primary_metric(schema)))
    if run.start == 1:
        flow.close_round(run, {"round": 0, **flow.evaluate(0, run.arrays)})
    for server_round in range(run.start, cfg.num_rounds + 1):
        began = time.monotonic()
        random.seed(cfg.seed * 7_919 + server_round)  # Flower samples nodes with `random`
        phase = flow.train_phase(server_round, run.arrays)
        run.refusals += phase.refused
        run.arrays = flow.next_global_model(server_round, phase, run.arrays)
        row = flow.round_row(server_round, phase)
        if phase.every_site_refused:  # no later round could train: end here, with checkpoint and report
            run.ended_early = flow.end_early(server_round)
        else:
            row.update(flow.evaluate(server_round, run.arrays))
        row["seconds"] = time.monotonic() - began
        flow.close_round(run, row)
        if run.ended_early:
            break
    arrays, selected_round, selection = flow.deliver(schema, run)
    return FederationResult(arrays=arrays, rounds=run.rounds, site_metrics=strategy.site_metrics,
                            rejected=strategy.rejected, run_dir=Path(cfg.run_dir), refusals=run.refusals,
                            ended_early=run.ended_early, selected_round=selected_round, selection=selection)
