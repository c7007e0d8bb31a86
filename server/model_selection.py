"""Which round's global model a run delivers: chosen on the sites' validation splits, or the last.

Why: pooled and local-only baselines stop early on their validation split, so a federation that always
delivers its last round is compared unfairly (on the shipped survival studies the federated test
C-index often peaks after 1-3 rounds and then declines). Each site scores every round's global model on
its own validation split and reports only the aggregate (``val_<metric>``, ``val_loss``, its validation
count); the server's ``eval_val_*`` columns are the count-weighted means. The test split is never used.

Rules (run config ``model-selection``):

- ``best-val`` (default): the highest site-weighted validation metric (C-index/AUC), ties broken by lower
  validation loss, then by the earlier round.
- ``best-val-loss``: the lowest pooled validation loss, sum over sites of loss x n_val / total n_val. A loss
  moves smoothly with the model, where a rank statistic on 12-19 validation rows jumps and ties.
- ``last``: the last round.

``model-selection-min-round`` keeps earlier rounds out (default 0 = auto, ``max(2, N // 3)``; 1 = none),
capped at the last scored round; ``model-selection-window`` (odd, default 1) ranks each round by the mean
of its and its neighbours' scores (rounds >= 1 that exist), so one noisy round cannot win alone.

Why these defaults (docs/benchmarks.md, "Model selection on tiny validation splits"; replayed with
benchmarks/model_selection.py on 10-round runs): on tiny validation splits the validation C-index ties
from round 1 on, and ties go to the earliest round, which is often round 1, barely trained. The automatic
minimum round was the only change that never delivered a worse test C-index on any measured seed; the
validation loss and the window did not beat it on average and were worse on some seeds.

The choice is a pure function of the per-round rows (kept in every checkpoint), so a resumed run chooses
exactly as an uninterrupted one. The chosen round's weights are read back from its checkpoint
(:func:`fedfusion.server.federation.run_federation`); :class:`BestRound` is kept for checkpoints written
before this, which carry the best round's weights themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfusion.common.federation_config import DEFAULTS, MODEL_SELECTIONS
from fedfusion.common.records import VAL_PREFIX

#: How each rule chose the delivered round, in words (reports, logs).
SELECTION_TEXT = {
    "best-val-loss": "the lowest site-weighted validation loss over the rounds (`eval_val_loss`)",
    "best-val": "the best site-weighted validation score over the rounds (`eval_val_*` columns)",
    "last": "the last round",
}


@dataclass(frozen=True)
class SelectionRule:
    """How the delivered round is chosen from the rounds' ``eval_val_*`` columns."""

    kind: str = DEFAULTS["model-selection"]
    """One of :data:`MODEL_SELECTIONS`."""
    metric: str = "c_index"
    """The schema's primary metric (higher is better): ``c_index`` or ``auc``."""
    min_round: int = DEFAULTS["model-selection-min-round"]
    """Rounds before this one are never chosen; 0 = auto (:func:`auto_min_round`), 1 = none."""
    window: int = DEFAULTS["model-selection-window"]
    """Odd; > 1 ranks round r by the mean over rounds r - window//2 .. r + window//2."""

    def __post_init__(self) -> None:
        if self.kind not in MODEL_SELECTIONS:
            raise ValueError(f"model-selection must be one of {list(MODEL_SELECTIONS)}, got {self.kind!r}")
        if self.min_round < 0:
            raise ValueError(f"model-selection-min-round must be >= 0 (0 = auto), got {self.min_round}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"model-selection-window must be an odd number >= 1, got {self.window}")

    @property
    def label(self) -> str:
        """Short description for logs and reports, e.g. ``best-val-loss (from round 3, window 3)``."""
        extra = []
        if self.min_round != 1:
            extra.append("min round auto" if self.min_round == 0 else f"from round {self.min_round}")
        if self.window > 1:
            extra.append(f"window {self.window}")
        return self.kind + (f" ({', '.join(extra)})" if extra else "")


def auto_min_round(num_rounds: int) -> int:
    """``max(2, N // 3)``: round 1 is mostly the initial model averaged once; a third of the run in, the
    sites' updates have met a few times. Capped at ``N`` (a 1-round run delivers round 1)."""
    return max(1, min(num_rounds, max(2, num_rounds // 3)))


def _value(row: Mapping[str, Any], key: str) -> float:
    try:
        value = float(row.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def round_scores(rows: Sequence[Mapping[str, Any]], rule: SelectionRule) -> dict[int, tuple[float, float]]:
    """Each candidate round's sort key ``(primary, secondary)``, larger is better, after smoothing.

    ``best-val``: (metric, -loss); ``best-val-loss``: (-loss, metric). Rounds without the primary value
    (validation withheld, a round every site refused) are no candidates and do not enter a window.
    """
    metric_key, loss_key = f"eval_{VAL_PREFIX}{rule.metric}", f"eval_{VAL_PREFIX}loss"
    raw: dict[int, tuple[float, float]] = {}
    for row in rows:
        server_round = int(row["round"])
        if server_round < 1:  # round 0 is the initial model: a federation delivers a trained one
            continue
        metric, loss = _value(row, metric_key), _value(row, loss_key)
        key = (metric, -loss) if rule.kind == "best-val" else (-loss, metric)
        if not math.isnan(key[0]):
            raw[server_round] = key
    half = rule.window // 2
    smoothed: dict[int, tuple[float, float]] = {}
    for server_round in raw:
        near = [raw[r] for r in range(server_round - half, server_round + half + 1) if r in raw]
        seconds = [s for _, s in near if not math.isnan(s)]
        smoothed[server_round] = (sum(p for p, _ in near) / len(near),
                                  sum(seconds) / len(seconds) if seconds else -math.inf)
    return smoothed


def choose_round(rows: Sequence[Mapping[str, Any]], rule: SelectionRule,
                 num_rounds: int | None = None) -> int | None:
    """The round to deliver, or None when no round after round 0 has the validation value the rule needs.

    ``last``: the last round in ``rows``. Otherwise the best :func:`round_scores` among rounds >= the
    minimum round (auto: from ``num_rounds``, default the last round); ties go to the earlier round.
    """
    trained = sorted(int(r["round"]) for r in rows if int(r["round"]) >= 1)
    if not trained:
        return None
    if rule.kind == "last":
        return trained[-1]
    scores = round_scores(rows, rule)
    if not scores:
        return None
    minimum = rule.min_round or auto_min_round(num_rounds if num_rounds is not None else trained[-1])
    minimum = min(minimum, max(scores))  # a run shorter than the minimum still delivers a scored round
    eligible = [r for r in sorted(scores) if r >= minimum]
    best = eligible[0]
    for server_round in eligible[1:]:
        if scores[server_round] > scores[best]:  # strictly better: ties keep the earlier round
            best = server_round
    return best


@dataclass
class BestRound:
    """The round whose global model scored best on the federated validation metric so far.

    Kept for the checkpoints written before :func:`choose_round` (their ``best`` entry holds the best
    round's weights; a resume falls back on them when that round's checkpoint file is gone), and as the
    incremental form of ``best-val`` without a minimum round or window.
    Ranked by the metric, then by lower validation loss (small validation splits tie on AUC 1.0).
    Round 0 (the initial model) never counts: a federation delivers a trained model.
    """

    metric: str
    round: int | None = None
    score: float = -math.inf
    loss: float = math.inf
    arrays: dict[str, np.ndarray] | None = None

    def offer(self, row: dict[str, Any], arrays: Callable[[], dict[str, np.ndarray]]) -> bool:
        """Consider round ``row['round']`` (its ``eval_val_*`` columns); True if it is the new best.

        ``arrays`` gives that round's weights; it is called (and its result copied) only for a new best.
        """
        score = float(row.get(f"eval_{VAL_PREFIX}{self.metric}", math.nan))
        loss = float(row.get(f"eval_{VAL_PREFIX}loss", math.inf))
        if int(row["round"]) < 1 or math.isnan(score):
            return False
        if (score, -loss) <= (self.score, -self.loss):
            return False
        self.round, self.score, self.loss = int(row["round"]), score, loss
        self.arrays = {k: np.array(v, copy=True) for k, v in arrays().items()}
        return True

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "round": self.round, "score": self.score, "loss": self.loss,
                "arrays": self.arrays}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, metric: str) -> BestRound:
        if not state or state.get("metric") != metric:
            return cls(metric)
        return cls(metric, state["round"], float(state["score"]), float(state["loss"]), state["arrays"])
