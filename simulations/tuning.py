"""A study's tuned methods (``fedprox-tuned``): one federation per value, the value kept chosen on validation.

Why validation and not test: a value picked on the test splits makes the method's reported test score
optimistic (the maximum of several noisy scores), the bias FLamby's protocol avoids for every other
choice. Each candidate's *delivered* model (``model-selection``) is scored by the sites' own validation
splits, as they reported them in the evaluate replies (``val_<metric>``, ``val_loss``, the validation
count); the candidates are ranked by the mean weighted by validation size (the server's own weighting,
:func:`fedfusion.server.federation.weighted_metric_mean`), then by lower validation loss, then by grid order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedfusion.common.records import VAL_COUNT_KEY, VAL_PREFIX
from fedfusion.simulations.experiment import Method


@dataclass(frozen=True)
class TunedChoice:
    """The value a tuned method kept, and every candidate's (validation metric, validation loss)."""

    key: str
    value: Any
    scores: Mapping[Any, tuple[float, float]]

    def describe(self, where: str, metric: str) -> str:
        """One line for the report's notes: the value kept and what each candidate scored."""
        tried = ", ".join(f"{v:g}: {s:.3f}" if isinstance(v, float) else f"{v}: {s:.3f}"
                          for v, (s, _) in self.scores.items())
        return (f"{where}: {self.key} = {self.value:g} chosen on validation (site-weighted val_{metric} of the "
                f"delivered model per {self.key}: {tried})")


def validation_score(evaluations: Sequence[Mapping[str, Any]], metric: str) -> tuple[float, float]:
    """(validation ``metric``, validation loss) of one delivered model over its sites' evaluate rows,
    each weighted by the site's validation size; NaN where no site reported a finite value."""
    from fedfusion.server.federation import weighted_metric_mean

    keys = (VAL_COUNT_KEY, f"{VAL_PREFIX}{metric}", f"{VAL_PREFIX}loss")
    rows = [{k: float(r[k]) for k in keys if k in r and math.isfinite(float(r[k]))} for r in evaluations]
    mean = weighted_metric_mean([r for r in rows if VAL_COUNT_KEY in r])
    return mean.get(keys[1], math.nan), mean.get(keys[2], math.nan)


def choose_on_validation(key: str, candidates: Mapping[Any, Sequence[Mapping[str, Any]]], metric: str) -> TunedChoice:
    """The candidate value whose delivered model's site evaluations score best on validation.

    ``candidates``: value -> that run's evaluate rows of its delivered model (test metrics may be in them;
    they are never read). Raises ValueError when no candidate has a validation score to choose on.
    """
    scores = {value: validation_score(rows, metric) for value, rows in candidates.items()}

    def rank(value: Any) -> tuple[float, float]:
        score, loss = scores[value]
        return (score if math.isfinite(score) else -math.inf), -(loss if math.isfinite(loss) else math.inf)

    if not any(math.isfinite(s) for s, _ in scores.values()):
        raise ValueError(f"no run of {key} in {list(candidates)} has a validation score (val_{metric}): the sites "
                         "need validation rows (split = val) to choose on; test is never used")
    best = max(candidates, key=rank)  # the first of equals: grid order breaks exact ties
    return TunedChoice(key, best, scores)


def run_tuned(method: Method, federate: Callable[[Method, str], tuple[Any, Path]],
              delivered: Callable[[Any], Sequence[Mapping[str, Any]]], metric: str
              ) -> tuple[TunedChoice, Any, Path]:
    """Run ``method`` once per tuned value and keep the best on validation.

    ``federate(method, tag)`` runs one federation (the study's own machinery) and returns (result, run dir);
    ``delivered(result)`` gives the delivered model's site evaluate rows. Each run's tag is
    ``<method>/<key>-<value>``. Returns (choice, the chosen run's result, its run dir).
    """
    runs: dict[Any, tuple[Any, Path]] = {}
    for value in method.tune_values:
        fixed = replace(method, overrides={**method.overrides, method.tune_key: value}, tune_key="", tune_values=())
        runs[value] = federate(fixed, f"{method.name}/{method.tune_key}-{value:g}")
    choice = choose_on_validation(method.tune_key, {v: delivered(r) for v, (r, _) in runs.items()}, metric)
    result, run_dir = runs[choice.value]
    return choice, result, run_dir


def with_choice(method: Method, choice: TunedChoice | None) -> Method:
    """``method`` fixed at its chosen value (for its unimodal / leave-one-site-out runs); unchanged if untuned."""
    if not method.tune_values or choice is None:
        return method
    return replace(method, overrides={**method.overrides, choice.key: choice.value}, tune_key="", tune_values=())
