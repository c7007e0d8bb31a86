"""Evaluation is no oracle: a small split answers with counts only, metrics leave rounded to 3 decimals,
through the real ClientApp evaluate handler; the server's aggregation, model selection and report cope."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args

from fedfusion.client.app import make_client_app
from fedfusion.client.daemon import SiteConfig
from fedfusion.client.eval_release import (
    EvalReleasePolicy,
    eval_release_policy,
    release_eval_metrics,
)
from fedfusion.common.config import ConfigError
from fedfusion.common.records import METRICS_KEY
from tests.dashboard_runs import toy_schema
from tests.sitegen import make_site

METRICS = {"loss", "auc", "balanced_accuracy", "ece", "brier", "accuracy", "c_index", "val_loss", "val_auc"}


def _evaluate(tmp_path: Path, n: int, extra: dict | None = None) -> dict[str, float]:
    """One evaluate message through the ClientApp (audit mod, handler, release rule) for a site of ``n`` cases."""
    from fedfusion.client.runtime import load_site
    from fedfusion.common.config import ModelConfig
    from fedfusion.common.flower_adapter import message_identity
    from fedfusion.common.records import model_to_arrays

    schema_path = toy_schema().save(tmp_path / "schema.json")
    manifest = make_site(tmp_path / f"site{n}", n=n, seed=n)  # the manifest's path
    node_config = {"manifest": str(manifest), "schema": str(schema_path), "site-id": "A",
                   "device": "cpu", **(extra or {})}
    run_config = {"schema": str(schema_path), "fusion": "concat", "seed": 1}
    site = load_site(node_config["manifest"], str(schema_path), "A", "cpu")
    arrays: ArrayRecord = model_to_arrays(site.build_model(ModelConfig(fusion="concat")))
    with message_identity(task_id=1, run_id=7, node_id=5):  # as Flower's runtime sets it for run 7 on node 5
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=5, message_type="evaluate")
        reply = make_client_app(run_config)(msg, Context(run_id=7, node_id=5, node_config=node_config,
                                                         state=RecordDict(), run_config={}))
    assert not reply.has_error(), reply.error
    return dict(reply.content[METRICS_KEY])


def test_small_split_answers_with_counts_only(tmp_path: Path) -> None:
    metrics = _evaluate(tmp_path, 40)  # 8 test and 8 validation cases < the default 20
    assert metrics == {"num-examples": 8, "num-examples-val": 8, "num-examples-withheld": 8,
                       "num-examples-val-withheld": 8}


def test_large_split_answers_rounded_metrics_and_exact_counts(tmp_path: Path) -> None:
    metrics = _evaluate(tmp_path, 150)  # 30 test and 30 validation cases
    assert METRICS <= set(metrics) and metrics["num-examples"] == 30 and metrics["num-examples-val"] == 30
    assert "num-examples-withheld" not in metrics and "num-examples-val-withheld" not in metrics
    assert metrics["n"] == 30 and 0 < metrics["events"] <= 30 and float(metrics["events"]).is_integer()
    for key in METRICS:
        assert metrics[key] == round(metrics[key], 3), (key, metrics[key])
    assert any(metrics[key] != round(metrics[key], 2) for key in METRICS)  # not coarser than 3 decimals


def test_site_can_lower_the_minimum(tmp_path: Path) -> None:
    metrics = _evaluate(tmp_path, 40, {"min-eval-cases": "8"})
    assert METRICS <= set(metrics) and "num-examples-withheld" not in metrics


def test_release_rule_judges_test_and_validation_splits_separately() -> None:
    raw = {"num-examples": 25, "loss": 0.123456, "auc": 0.87654, "n": 25, "events": 9,
           "num-examples-val": 10, "val_loss": 0.5555, "val_auc": 0.61}
    out = release_eval_metrics(raw, EvalReleasePolicy(min_cases=20))
    assert out == {"num-examples": 25, "loss": 0.123, "auc": 0.877, "n": 25, "events": 9,
                   "num-examples-val": 10, "num-examples-val-withheld": 10}
    assert release_eval_metrics(raw, EvalReleasePolicy(min_cases=0, decimals=None)) == raw


def test_simulation_releases_everything_unless_the_run_asks() -> None:
    assert eval_release_policy({"partition-id": 0}, {}) == EvalReleasePolicy(0, None)
    assert eval_release_policy({"partition-id": 0}, {"sim-min-eval-cases": 20}) == EvalReleasePolicy(20, 3)
    assert eval_release_policy({"manifest": "m.csv"}, {}) == EvalReleasePolicy(20, 3)


BASE = ('[site]\nid = "A"\nmanifest = "m.csv"\nschema = "s.json"\n{extra}'
        '[coordinator]\naddress = "c:1"\ninsecure = true\n')


def test_site_toml_min_eval_cases_reaches_the_client_app(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(BASE.format(extra="min-eval-cases = 50\n"))
    node = parse_config_args([SiteConfig.load(path).node_config()])
    assert eval_release_policy(node, {}) == EvalReleasePolicy(50, 3)
    path.write_text(BASE.format(extra=""))
    assert eval_release_policy(parse_config_args([SiteConfig.load(path).node_config()]), {}).min_cases == 20


@pytest.mark.parametrize("value", ["-1", '"many"', "true", "2.5"])
def test_bad_min_eval_cases_is_named(tmp_path: Path, value: str) -> None:
    path = tmp_path / "site.toml"
    path.write_text(BASE.format(extra=f"min-eval-cases = {value}\n"))
    with pytest.raises(ConfigError, match=r"\[site\]: min-eval-cases must be a whole number"):
        SiteConfig.load(path)


def test_server_aggregation_selection_and_report_cope_with_counts_only(tmp_path: Path) -> None:
    import numpy as np

    from fedfusion.common.records import numpy_to_arrays
    from fedfusion.server.federation import FederationResult, weighted_metric_mean
    from fedfusion.server.model_selection import BestRound
    from fedfusion.server.report import write_run_outputs

    small = {"num-examples": 8, "num-examples-val": 8, "num-examples-withheld": 8, "num-examples-val-withheld": 8}
    large = {"num-examples": 30, "num-examples-val": 30, "c_index": 0.7, "loss": 1.2, "val_c_index": 0.65,
             "val_loss": 1.1, "n": 30, "events": 12}
    mean = weighted_metric_mean([small, large])
    assert mean["c_index"] == 0.7 and mean["val_c_index"] == 0.65  # the counts-only site does not dilute
    assert mean["num-examples"] == 38 and mean["num-examples-withheld"] == 8 and mean["events"] == 12
    only_small = weighted_metric_mean([small, small])
    assert "val_c_index" not in only_small
    best = BestRound("c_index")
    assert not best.offer({"round": 1, **{f"eval_{k}": v for k, v in only_small.items()}}, lambda: {})
    assert best.offer({"round": 2, **{f"eval_{k}": v for k, v in mean.items()}}, lambda: {})

    evaluate = [{"round": 1, "phase": "evaluate", "site": "S", **small},
                {"round": 1, "phase": "evaluate", "site": "L", **large}]
    result = FederationResult(arrays=numpy_to_arrays({"w": np.zeros(2, dtype=np.float32)}),
                              rounds=[{"round": 1, **{f"eval_{k}": v for k, v in mean.items()}}],
                              site_metrics=evaluate, run_dir=tmp_path)
    report = write_run_outputs(result).read_text()
    assert "| S |" in report and "| L |" in report
    assert '"primary_metric": "c_index"' in (tmp_path / "summary.json").read_text()
    assert math.isfinite(mean["loss"])
