"""Study statistics on synthetic records: bootstrap intervals cover the truth, paired differences and
sign counts on known numbers, optimistic vs fair best local-only, counts per site, and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as student_t

import fedfusion.simulations.study_plots as study_plots
from fedfusion.common.metrics import auc, concordance_index
from fedfusion.common.training import Predictions
from fedfusion.simulations.experiment import Study, StudyRecord
from fedfusion.simulations.study_report import (
    FAIR_BEST_LOCAL,
    add_best_local,
    add_fair_best_local,
    per_seed_means,
    summarise,
    write_study_outputs,
)
from fedfusion.simulations.study_statistics import (
    NOT_RECORDED,
    bootstrap_intervals,
    case_counts,
    case_score,
    paired_by_site,
    paired_difference,
    sign_text,
    site_counts,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _binary(rng: np.random.Generator, n: int, shift: float = 1.0) -> Predictions:
    """Positives score N(shift, 1), negatives N(0, 1): population AUC = Phi(shift / sqrt 2)."""
    labels = (rng.random(n) < 0.4).astype(int)
    score = rng.normal(0.0, 1.0, n) + shift * labels
    p = 1 / (1 + np.exp(-score))
    return Predictions(probs=np.stack([1 - p, p], axis=1), labels=labels)


def _survival(rng: np.random.Generator, n: int) -> Predictions:
    """Exponential times with log-hazard = risk, 30 % independent censoring."""
    risk = rng.normal(0.0, 1.0, n)
    event_time = rng.exponential(np.exp(-risk))
    censor = rng.exponential(np.exp(-risk).mean() / 0.3 * 0.7, n)
    return Predictions(risk=risk, time=np.minimum(event_time, censor), event=(event_time <= censor).astype(int))


# ----------------------------------------------------------------------------------- intervals


def test_the_score_matches_the_project_metrics_binary_with_ties_and_multiclass() -> None:
    rng = np.random.default_rng(0)
    pred = _binary(rng, 80)
    pred.probs = np.round(pred.probs, 1)  # ties count half, as scikit-learn's AUC does
    assert case_score("auc", pred) == pytest.approx(auc(pred.labels, pred.probs), abs=1e-12)
    labels = rng.choice([0, 2, 3], 60)  # class 1 absent: macro mean over the classes present
    probs = rng.dirichlet(np.ones(4), 60)
    multi = Predictions(probs=probs, labels=labels)
    assert case_score("auc", multi) == pytest.approx(auc(labels, probs), abs=1e-12)
    surv = _survival(rng, 50)
    assert case_score("c_index", surv) == concordance_index(surv.time, surv.event, surv.risk)
    assert math.isnan(case_score("auc", Predictions(probs=probs[:5], labels=np.zeros(5, int))))


def test_a_site_interval_covers_the_population_auc_about_95_percent_of_the_time() -> None:
    truth = float(norm.cdf(1 / math.sqrt(2)))  # 0.760
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(60):
        found = bootstrap_intervals([(0, "A", _binary(rng, 120))], "auc", resamples=300)
        _, low, high = found["sites"]["A"]
        covered += low <= truth <= high
    assert 0.85 <= covered / 60 <= 1.0  # nominal 0.95


def test_the_mean_over_sites_interval_is_flambys_number_and_contains_the_truth() -> None:
    rng = np.random.default_rng(2)
    preds = [(seed, site, _binary(rng, 150, shift)) for seed in (0, 1)
             for site, shift in (("A", 0.5), ("B", 1.0), ("C", 1.5))]
    truth = float(np.mean([norm.cdf(s / math.sqrt(2)) for s in (0.5, 1.0, 1.5)]))

    found = bootstrap_intervals(preds, "auc", resamples=500)

    per_seed = [np.mean([auc(p.labels, p.probs) for s, _, p in preds if s == seed]) for seed in (0, 1)]
    estimate, low, high = found["mean"]
    assert estimate == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert low < estimate < high and low <= truth <= high
    site_widths = [hi - lo for _, lo, hi in found["sites"].values()]
    assert high - low < min(site_widths)  # three sites' cases pin the mean down better than one site's


def test_a_c_index_interval_contains_the_large_sample_value() -> None:
    rng = np.random.default_rng(3)
    big = _survival(rng, 3000)
    truth = concordance_index(big.time, big.event, big.risk)
    found = bootstrap_intervals([(0, "A", _survival(rng, 150))], "c_index", resamples=300)
    _, low, high = found["sites"]["A"]
    assert low <= truth <= high and high - low < 0.2


def test_methods_with_the_same_predictions_get_the_same_resampled_patients() -> None:
    rng = np.random.default_rng(4)
    preds = [(0, "A", _binary(rng, 60)), (0, "B", _binary(rng, 60))]
    assert bootstrap_intervals(preds, "auc", resamples=200) == bootstrap_intervals(list(reversed(preds)), "auc",
                                                                                   resamples=200)


# ----------------------------------------------------------------------------------- paired


def test_paired_differences_sign_count_and_t_interval_on_known_numbers() -> None:
    method = {0: 0.80, 1: 0.75, 2: 0.82, 3: 0.70, 4: 0.78, 5: 0.9}
    reference = {0: 0.78, 1: 0.76, 2: 0.79, 3: 0.69, 4: 0.74, 5: math.nan}  # seed 5: not paired

    diff = paired_difference(method, reference)

    d = np.array([0.02, -0.01, 0.03, 0.01, 0.04])
    half = student_t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert diff["n_seeds"] == 5 and diff["mean"] == pytest.approx(0.018)
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((0.018 - half, 0.018 + half))
    assert sign_text(diff) == "better in 4/5 seeds" and diff["worse"] == 1
    one = paired_difference({0: 0.8}, {0: 0.7})
    assert one["mean"] == pytest.approx(0.1) and math.isnan(one["ci_low"])


def test_per_site_differences_pair_each_site_with_its_own_local_model() -> None:
    values = {("fedavg", "A"): (0.8, 0.9), ("fedavg", "B"): (0.6, 0.7),
              ("local-only", "A"): (0.7, 0.8), ("local-only", "B"): (0.65, 0.75)}
    rows = [{"seed": s, "method": m, "site": site, "auc": v[s]} for (m, site), v in values.items() for s in (0, 1)]

    out = {r["site"]: r for r in paired_by_site(rows, ["fedavg"], "auc")}

    assert out["A"]["mean_diff"] == pytest.approx(0.1) and out["A"]["better"] == 2
    assert out["B"]["mean_diff"] == pytest.approx(-0.05) and out["B"]["worse"] == 2


# ----------------------------------------------------------------------------------- best local-only


def _local_cross(test: dict[str, tuple[float, float]], val: dict[str, tuple[float, float]] | None,
                 seeds: tuple[int, ...] = (0, 1)) -> list[dict[str, Any]]:
    rows = []
    for seed in seeds:
        for k, scores in test.items():
            for i, site in enumerate(("A", "B")):
                row = {"seed": seed, "method": f"local model {k}", "family": "local-cross", "site": site,
                       "model_site": k, "modalities": "clinical", "auc": scores[i]}
                if val is not None:
                    row["val_auc"] = val[k][i]
                rows.append(row)
    return rows


def test_the_fair_best_local_is_chosen_on_validation_not_test() -> None:
    # A is best on test (0.85 vs 0.725) but worst on validation (0.60 vs 0.80)
    rows = _local_cross({"A": (0.9, 0.8), "B": (0.7, 0.75)}, {"A": (0.6, 0.6), "B": (0.8, 0.8)})

    assert add_best_local(rows, "auc") == "A" and add_fair_best_local(rows, "auc") == "B"
    fair = [r for r in rows if r["method"] == FAIR_BEST_LOCAL]
    assert {r["model_site"] for r in fair} == {"B"} and {r["chosen_on"] for r in fair} == {"validation"}
    assert per_seed_means(rows, FAIR_BEST_LOCAL, "auc") == pytest.approx({0: 0.725, 1: 0.725})


def test_optimistic_best_local_is_never_below_the_fair_one() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        owners = "ABCD"
        rows = _local_cross({k: tuple(rng.random(2)) for k in owners}, {k: tuple(rng.random(2)) for k in owners},
                            seeds=(0,))
        add_best_local(rows, "auc")
        add_fair_best_local(rows, "auc")
        means = {s["method"]: s["auc_mean"] for s in summarise(rows, "auc")}
        assert means["best local-only"] >= means[FAIR_BEST_LOCAL]


def test_without_validation_scores_there_is_no_fair_choice() -> None:
    rows = _local_cross({"A": (0.9, 0.8), "B": (0.7, 0.75)}, None)
    assert add_fair_best_local(rows, "auc") is None and not any(r["method"] == FAIR_BEST_LOCAL for r in rows)


# ----------------------------------------------------------------------------------- counts


def test_counts_name_events_and_positives_and_show_a_range_over_seeds() -> None:
    surv = Predictions(risk=np.zeros(5), time=np.ones(5), event=np.array([1, 0, 1, 1, 0]))
    assert case_counts(surv) == {"events": 3.0}
    binary = Predictions(probs=np.full((4, 2), 0.5), labels=np.array([1, 0, 1, 1]))
    assert case_counts(binary) == {"positives": 3.0}
    three = Predictions(probs=np.full((4, 3), 1 / 3), labels=np.array([0, 2, 2, 1]))
    assert case_counts(three) == {"class_counts": "1/1/2"}
    rows = [{"seed": 0, "site": "A", "family": "baseline", "n_test": 40.0, "positives": 10.0},
            {"seed": 1, "site": "A", "family": "federated", "n_test": 42.0, "positives": 10.0},
            {"seed": 0, "site": "A", "family": "tabular", "n_test": 99.0}]  # other rows: not the test split
    assert site_counts(rows) == [{"site": "A", "test n": "40–42", "positives": "10", "seeds": 2}]


# ----------------------------------------------------------------------------------- plots


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plot functions draw, kept for inspection; they are still saved to disk."""
    kept: list[Any] = []
    save = study_plots._save
    monkeypatch.setattr(study_plots, "_save", lambda fig, path: kept.append(fig) or save(fig, path))
    return kept


def test_site_bars_carry_the_bootstrap_interval(figures: list[Any], tmp_path: Path) -> None:
    by_site = [{"method": m, "site": s, "auc_mean": 0.7, "auc_sd": 0.05} for m in ("pooled", "fedavg")
               for s in ("A", "B", "C")]
    intervals = {(m, s): (0.6, 0.75) for m in ("pooled", "fedavg") for s in ("A", "B", "C")}

    path = study_plots.plot_sites(by_site, ["pooled", "fedavg"], "auc", tmp_path / "s.png", intervals)

    assert path is not None and path.read_bytes()[:8] == PNG
    (ax,) = figures[0].axes
    bars = [c for c in ax.containers if getattr(c, "errorbar", None) is not None]
    assert sum(len(c.patches) for c in bars) == 6  # 2 methods x 3 sites
    segments = bars[0].errorbar.lines[2][0].get_segments()
    assert [(round(float(s[0, 1]), 3), round(float(s[1, 1]), 3)) for s in segments] == [(0.6, 0.75)] * 3


def test_the_vs_local_scatter_has_one_point_per_method_and_site_and_a_diagonal(figures: list[Any],
                                                                                tmp_path: Path) -> None:
    by_site = [{"method": m, "site": s, "auc_mean": v} for m, values in
               {"local-only": (0.6, 0.7, 0.8), "fedavg": (0.7, 0.72, math.nan), "fedprox": (0.65, 0.75, 0.78)}.items()
               for s, v in zip("ABC", values, strict=True)]

    path = study_plots.plot_vs_local(by_site, ["fedavg", "fedprox"], "auc", tmp_path / "v.png")

    assert path is not None and path.read_bytes()[:8] == PNG
    (ax,) = figures[0].axes
    assert [len(c.get_offsets()) for c in ax.collections] == [2, 3]  # fedavg's NaN site C is left out
    assert ax.collections[1].get_offsets()[0].tolist() == [0.6, 0.65]  # x = local-only, y = method
    (diagonal,) = ax.get_lines()
    xs, ys = diagonal.get_data()
    assert list(xs) == list(ys)


# ----------------------------------------------------------------------------------- the report


def test_the_report_shows_counts_intervals_paired_differences_and_says_what_is_missing(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    record = StudyRecord(study=Study(dataset="toy", name="toy", seeds=(0, 1), partition="iid"), out_dir=tmp_path,
                         dataset_name="toy", metric="auc", task="classification", modalities=("clinical",))
    shift = {"pooled": 1.2, "local-only": 0.6, "fedavg": 1.0, "local model A": 0.8, "local model B": 0.6}
    for seed in (0, 1):
        for site in ("A", "B"):
            for method, family in (("pooled", "baseline"), ("local-only", "baseline"), ("fedavg", "federated"),
                                   ("local model A", "local-cross"), ("local model B", "local-cross")):
                pred = _binary(rng, 80, shift[method])
                extra = {"model_site": method[-1], "val_auc": 0.9 if method.endswith("B") else 0.5} \
                    if family == "local-cross" else {}
                record.rows.append({"seed": seed, "method": method, "family": family, "site": site,
                                    "modalities": "clinical", "auc": auc(pred.labels, pred.probs),
                                    "n_test": 80.0, **case_counts(pred), **extra})
                record.predictions.setdefault(method, []).append((seed, site, pred))
            record.rows.append({"seed": seed, "method": "random_forest", "family": "tabular", "site": site,
                                "modalities": "clinical", "auc": 0.7})  # tabular rows keep no predictions

    write_study_outputs(record)

    report = (tmp_path / "report.md").read_text()
    for text in ("### Test sets per site", "### 95 % bootstrap intervals", "### Paired differences over seeds",
                 f"| random_forest | {NOT_RECORDED} |", "best local-only (optimistic: chosen on test)",
                 "best local-only (fair: chosen on validation)", "better in", "plots/vs_local_auc.png"):
        assert text in report, text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_local_site_fair"] == "B"  # chosen on validation
    intervals = {(r["method"], r["site"]): r for r in summary["statistics"]["intervals"]}
    mean = intervals[("fedavg", "mean over sites")]
    assert mean["ci_low"] < mean["estimate"] < mean["ci_high"]
    assert mean["estimate"] == pytest.approx(np.mean(list(per_seed_means(record.rows, "fedavg", "auc").values())))
    assert intervals[(FAIR_BEST_LOCAL, "A")]["estimate"] == pytest.approx(
        np.mean([r["auc"] for r in record.rows if r["method"] == "local model B" and r["site"] == "A"]))
    paired = {(p["method"], p["reference"]) for p in summary["statistics"]["paired_differences"]}
    assert paired == {("fedavg", ref) for ref in ("pooled", FAIR_BEST_LOCAL, "best local-only", "local-only")}
    assert (tmp_path / "site_counts.csv").read_text().startswith("site,test n,positives,seeds")
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == report.count("](plots/")


def test_the_cross_study_goal_table_adds_intervals_sign_counts_and_the_fair_best_local(tmp_path: Path) -> None:
    from fedfusion.common.results import write_rows
    from fedfusion.simulations.study_compare import goal_table, load_study_output

    per_seed = {"fedavg": (0.80, 0.82, 0.78), "pooled": (0.81, 0.80, 0.80), "best local-only": (0.79, 0.80, 0.79),
                FAIR_BEST_LOCAL: (0.70, 0.72, 0.71)}
    family = {"fedavg": "federated", "pooled": "baseline"}
    write_rows(tmp_path / "results.csv", [{"seed": s, "method": m, "family": family.get(m, "best-local"), "site": "A",
                                           "auc": v[s]} for m, v in per_seed.items() for s in range(3)])
    (tmp_path / "summary.json").write_text(json.dumps({"study": "toy", "dataset": "d", "metric": "auc"}))
    (tmp_path / "study.json").write_text(json.dumps({"partition": "iid"}))

    (row,) = goal_table([load_study_output(tmp_path)])

    d = np.array([-0.01, 0.02, -0.02])  # fedavg - pooled
    half = student_t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert row["95 % CI, seeds (pooled)"] == (f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}], "
                                              "better in 1/3 seeds")
    assert row["Δ vs fair best local-only [95 % CI], seeds"].endswith("better in 3/3 seeds")
    assert row[">= fair best local-only?"] == "yes"
