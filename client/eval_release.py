"""What a site releases when the coordinator asks it to evaluate a model: no oracle over small splits.

Why: the coordinator chooses the weights it asks a site to evaluate, and evaluation is not charged to
the DP ledger. With full-precision loss, Brier score and accuracy on a split of a few cases, a crafted
model turns each evaluate request into a query about individual patients (e.g. a model that is
confident on one case only: the loss then moves with that patient's label). Two rules bound that:

- **minimum split size** (``[site] min-eval-cases`` in site.toml, default 20): a split with fewer cases
  releases only its size (``num-examples`` / ``num-examples-val``) and how many cases were withheld
  (``num-examples-withheld`` / ``num-examples-val-withheld``); no loss, AUC, accuracy, Brier, ECE,
  C-index, and no event count. Event counts (``events``) and ``n`` are sent only with the metrics;
- **fixed precision**: every released metric is rounded to 3 decimals (:data:`DECIMALS`), the precision
  reports print. A crafted model's effect on one patient then shows only when it moves the metric by
  ≥ 0.0005; on ≥ 20 cases one patient moves accuracy by ≥ 0.05 anyway, so nothing a report uses is lost.

This bounds, it does not eliminate, what repeated evaluations reveal: a coordinator can still send many
models. Sites that need more keep ``min-eval-cases`` high or evaluate on splits they can afford to
reveal. The server treats a counts-only reply as "no metric from this site" (its sizes still add up).

Simulations (no ``manifest`` in the node config) release everything at full precision unless the run
config sets ``sim-min-eval-cases``: researchers' benchmark tables are not a site's disclosure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedfusion.common.config import ConfigError
from fedfusion.common.records import NUM_EXAMPLES, VAL_COUNT_KEY, VAL_PREFIX

DEFAULT_MIN_EVAL_CASES = 20
DECIMALS = 3
#: Node-config key (written by ``site start`` from site.toml ``[site] min-eval-cases``).
NODE_CONFIG_KEY = "min-eval-cases"
#: Run-config key that turns the rule on in simulation (0 or absent: off).
SIM_RUN_CONFIG_KEY = "sim-min-eval-cases"
TEST_WITHHELD_KEY = f"{NUM_EXAMPLES}-withheld"
VAL_WITHHELD_KEY = f"{VAL_COUNT_KEY}-withheld"
#: Exact counts that go with the test metrics (survival: comparable cases and events).
_TEST_COUNTS = ("n", "events")


@dataclass(frozen=True)
class EvalReleasePolicy:
    """``min_cases``: smallest split whose metrics leave the site; ``decimals``: None = full precision."""

    min_cases: int = DEFAULT_MIN_EVAL_CASES
    decimals: int | None = DECIMALS


def parse_min_eval_cases(value: Any, source: str) -> int:
    """A whole number >= 0 (0: release metrics of every split); anything else names ``source``."""
    if isinstance(value, bool):
        raise ConfigError(f"{source}: min-eval-cases must be a whole number of cases (e.g. 20), got {value!r}")
    try:
        number = int(str(value).strip())
    except ValueError:
        number = -1
    if number < 0:
        raise ConfigError(f"{source}: min-eval-cases must be a whole number of cases >= 0 (e.g. 20), got {value!r}")
    return number


def eval_release_policy(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> EvalReleasePolicy:
    """The site's rule: node config in a deployment (default 20, 3 decimals), the run config in simulation."""
    if "manifest" in node_config:
        value = node_config.get(NODE_CONFIG_KEY, DEFAULT_MIN_EVAL_CASES)
        return EvalReleasePolicy(parse_min_eval_cases(value, f"node config {NODE_CONFIG_KEY}"), DECIMALS)
    value = run_config.get(SIM_RUN_CONFIG_KEY, 0) or 0
    minimum = parse_min_eval_cases(value, f"run config {SIM_RUN_CONFIG_KEY}")
    return EvalReleasePolicy(minimum, DECIMALS) if minimum else EvalReleasePolicy(0, None)


def release_eval_metrics(metrics: Mapping[str, float], policy: EvalReleasePolicy) -> dict[str, float]:
    """The part of :meth:`SiteRuntime.evaluate`'s metrics this site sends (see the module doc).

    Test metrics are judged by ``num-examples``, validation metrics (``val_*``) by ``num-examples-val``.
    """
    out: dict[str, float] = {}
    test_n = int(metrics.get(NUM_EXAMPLES, 0))
    val_n = int(metrics.get(VAL_COUNT_KEY, 0))
    test_ok, val_ok = test_n >= policy.min_cases, val_n >= policy.min_cases
    for key, value in metrics.items():
        if key in (NUM_EXAMPLES, VAL_COUNT_KEY):
            out[key] = value
        elif key in _TEST_COUNTS:
            if test_ok:
                out[key] = value
        elif key.startswith(VAL_PREFIX):
            if val_ok:
                out[key] = _rounded(value, policy.decimals)
        elif test_ok:
            out[key] = _rounded(value, policy.decimals)
    if not test_ok:
        out[TEST_WITHHELD_KEY] = test_n
    if VAL_COUNT_KEY in metrics and not val_ok:
        out[VAL_WITHHELD_KEY] = val_n
    return out


def _rounded(value: float, decimals: int | None) -> float:
    return float(value) if decimals is None else round(float(value), decimals)
