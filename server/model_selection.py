"""Which round's global model a run delivers: the best on the sites' validation splits, or the last.

Why: pooled and local-only baselines stop early on their validation split, so a federation that always
delivers its last round is compared unfairly (on the shipped survival studies the federated test
C-index peaks after 1-3 rounds and then declines). Each site scores every round's global model on its
own validation split and reports only the aggregate (``val_<metric>``, ``val_loss``, its validation
count); the server ranks rounds by the count-weighted mean. The test split is never used to choose.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfusion.common.records import VAL_PREFIX


@dataclass
class BestRound:
    """The round whose global model scored best on the federated validation metric so far.

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
