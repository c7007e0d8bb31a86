"""``fedprox-tuned``: FedProx once per μ, the μ kept chosen on the sites' validation splits (weighted by
their validation sizes), never on test; the study's notes and rows name the μ chosen in each seed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord

from fedfusion.server.federation import FederationResult
from fedfusion.simulations.experiment import Method, StudyError, StudyRecord, parse_study
from fedfusion.simulations.tuning import choose_on_validation, run_tuned, validation_score, with_choice


def _row(site: str, val: float, val_n: int, test: float, val_loss: float = 1.0) -> dict[str, Any]:
    """One site's evaluate row of a delivered model, as the site reports it."""
    return {"round": 2, "phase": "evaluate", "site": site, "num-examples": 20.0, "c_index": test,
            "num-examples-val": float(val_n), "val_c_index": val, "val_loss": val_loss}


# μ = 0.01 is best on validation weighted by validation size (A has 40 val cases, B 5): 0.667 vs 0.617;
# μ = 0.1 is best on test (0.80) and on the unweighted validation mean (0.675 vs 0.55).
CANDIDATES = {
    0.001: [_row("A", 0.55, 40, 0.60), _row("B", 0.50, 5, 0.60)],
    0.01: [_row("A", 0.70, 40, 0.55), _row("B", 0.40, 5, 0.55)],
    0.1: [_row("A", 0.60, 40, 0.80), _row("B", 0.75, 5, 0.80)],
}


def test_the_choice_follows_site_weighted_validation_not_test() -> None:
    choice = choose_on_validation("proximal-mu", CANDIDATES, "c_index")
    assert choice.value == 0.01
    assert choice.scores[0.01][0] == pytest.approx((40 * 0.70 + 5 * 0.40) / 45)
    assert choice.scores[0.1][0] == pytest.approx((40 * 0.60 + 5 * 0.75) / 45)
    note = choice.describe("seed 3, fedprox-tuned", "c_index")
    assert note.startswith("seed 3, fedprox-tuned: proximal-mu = 0.01 chosen on validation") and "0.1: 0.617" in note


def test_ties_go_to_the_lower_validation_loss_and_no_validation_is_an_error() -> None:
    tied = {0.01: [_row("A", 0.7, 10, 0.9, val_loss=2.0)], 0.1: [_row("A", 0.7, 10, 0.5, val_loss=1.5)]}
    assert choose_on_validation("proximal-mu", tied, "c_index").value == 0.1
    unscored = {0.01: [{"site": "A", "c_index": 0.9, "num-examples": 10.0}],
                0.1: [_row("A", math.nan, 10, 0.5)]}  # NaN val metric (no comparable pair): not a score
    assert math.isnan(validation_score(unscored[0.1], "c_index")[0])
    with pytest.raises(ValueError, match="need validation rows"):
        choose_on_validation("proximal-mu", unscored, "c_index")


def test_run_tuned_runs_each_value_through_the_given_machinery_and_keeps_the_chosen_run(tmp_path: Path) -> None:
    method = parse_study({"dataset": "ovarian", "methods": ["fedprox-tuned"]}).method("fedprox-tuned")
    assert method.tune_key == "proximal-mu" and method.tune_values == (0.001, 0.01, 0.1)
    ran: list[tuple[str, dict[str, Any]]] = []

    def federate(fixed: Method, tag: str) -> tuple[list[dict[str, Any]], Path]:
        ran.append((tag, dict(fixed.overrides)))
        assert not fixed.tune_values  # each run is a plain FedProx run at one μ
        return CANDIDATES[fixed.overrides["proximal-mu"]], tmp_path / tag

    choice, result, run_dir = run_tuned(method, federate, lambda rows: rows, "c_index")
    assert [tag for tag, _ in ran] == ["fedprox-tuned/proximal-mu-0.001", "fedprox-tuned/proximal-mu-0.01",
                                       "fedprox-tuned/proximal-mu-0.1"]
    assert all(o["strategy"] == "fedprox" for _, o in ran)
    assert choice.value == 0.01 and result is CANDIDATES[0.01]
    assert run_dir == tmp_path / "fedprox-tuned/proximal-mu-0.01"
    fixed = with_choice(method, choice)
    assert fixed.overrides["proximal-mu"] == 0.01 and not fixed.tune_values
    plain = Method("fedavg", "federated", {"strategy": "fedavg"})
    assert with_choice(plain, choice) is plain


def test_the_grid_is_a_study_key_validated_with_clear_errors() -> None:
    study = parse_study({"dataset": "ovarian", "methods": ["fedprox-tuned"], "fedprox-mu-grid": [1, 0.5]})
    assert study.method("fedprox-tuned").tune_values == (1.0, 0.5)
    with pytest.raises(StudyError, match="'fedprox-mu-grid' must be a non-empty list of positive numbers"):
        parse_study({"dataset": "ovarian", "methods": ["fedprox-tuned"], "fedprox-mu-grid": [0.1, -1]})
    with pytest.raises(StudyError, match="'fedprox-mu-grid' lists a value twice"):
        parse_study({"dataset": "ovarian", "methods": ["fedprox-tuned"], "fedprox-mu-grid": [0.1, 0.1]})
    with pytest.raises(StudyError, match="'fedprox-mu-grid' is set but 'fedprox-tuned' is not in 'methods'"):
        parse_study({"dataset": "ovarian", "methods": ["fedavg"], "fedprox-mu-grid": [0.1]})


def test_a_seed_scores_the_chosen_run_and_its_notes_name_the_mu(tmp_path: Path) -> None:
    """The study runner's glue, with its federations replaced by finished results (rows from CANDIDATES).
    A private head keeps the runner from rescoring model.pt, which these results do not have."""
    from fedfusion.simulations.study_runner import SeedRun
    from tests.dashboard_runs import toy_schema

    study = parse_study({"dataset": "ovarian", "methods": ["fedprox-tuned"], "run-config": {"private-parts": "head"}})
    record = StudyRecord(study=study, out_dir=tmp_path)
    run = SeedRun(study, 3, 1, tmp_path / "seed-3", record, None, "token")
    run.metric, run.schema = "c_index", toy_schema()
    tags: list[str] = []

    def federate(method: Method, tag: str, schema_path: Path, sites: dict[str, Path]) -> tuple[Any, Path]:
        tags.append(tag)
        rows = CANDIDATES[method.overrides["proximal-mu"]]
        return FederationResult(arrays=ArrayRecord(), rounds=[{"round": 2}], site_metrics=rows,
                                selected_round=2), tmp_path / tag

    run.federate = federate  # type: ignore[method-assign]
    run.schema_path, run.sites = tmp_path / "schema.json", {}
    run.run_federated(study.method("fedprox-tuned"))
    assert len(tags) == 3 and run.chosen["fedprox-tuned"].value == 0.01
    rows = [r for r in record.rows if r["method"] == "fedprox-tuned"]
    assert sorted(r["site"] for r in rows) == ["A", "B"]
    assert all(r["chosen_proximal_mu"] == 0.01 and r["c_index"] == 0.55 for r in rows)  # the chosen run's test
    assert record.notes == [run.chosen["fedprox-tuned"].describe("seed 3, fedprox-tuned", "c_index")]
