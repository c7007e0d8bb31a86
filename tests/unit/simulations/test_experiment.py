"""Study files parse with errors that name the key; summaries follow FLamby's convention; modality
subsets and test-time ablation handle missing modalities. (The Flower runs are in
tests/integration/test_experiment.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedfusion.cli import main
from fedfusion.common.config import ModelConfig, Schema, load_schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.federation_config import DEFAULTS
from fedfusion.common.manifest import load_manifest
from fedfusion.common.models import create_model
from fedfusion.common.training import metrics_from
from fedfusion.simulations.experiment import (
    BUILTIN_METHODS,
    StudyError,
    StudyRecord,
    ended_early_lines,
    load_study,
    parse_study,
)
from fedfusion.simulations.study_report import add_best_local, fusion_table, per_seed_means, summarise
from fedfusion.simulations.study_runner import predict_without, write_modality_subset
from tests.sitegen import OMICS, make_site

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"


def test_a_minimal_study_gets_the_documented_defaults() -> None:
    study = parse_study({"dataset": "lung"})

    assert study.name == "lung-natural" and study.partition == "natural" and study.seeds == (0,)
    assert [(m.name, m.kind) for m in study.methods] == [("pooled", "pooled"), ("local-only", "local-only"),
                                                         ("fedavg", "federated")]
    assert study.rounds == 5 and study.local_epochs == 2 and study.fusion == "attention"
    assert study.unimodal is None and study.ablation and study.tabular is True and not study.leave_one_site_out


def test_a_full_study_parses_methods_partition_training_and_overrides() -> None:
    study = parse_study({
        "dataset": "wdbc-multimodal", "seeds": 3, "rounds": 4, "methods": ["pooled", "fedprox", "strong-prox"],
        "unimodal": True, "tabular": ["random_forest"],
        "partition": {"how": "dirichlet", "num-sites": 4, "alpha": 0.3, "missing-modality": "image",
                      "missing-fraction": 0.2},
        "training": {"lr": 1, "baseline-epochs": 5, "device": "cpu"},
        "run-config": {"proximal-mu": 0.1},
        "method": {"strong-prox": {"strategy": "fedprox", "proximal-mu": 1.0}},
    })

    assert study.seeds == (0, 1, 2) and study.num_sites == 4 and study.lr == 1.0 and study.baseline_epochs == 5
    assert study.partition_options == {"alpha": 0.3, "missing_modality": "image", "missing_fraction": 0.2}
    assert study.method("strong-prox").overrides == {"strategy": "fedprox", "proximal-mu": 1.0}
    assert study.method("fedprox").overrides == {"strategy": "fedprox"}
    assert study.run_config == {"proximal-mu": 0.1}
    assert study.unimodal == ("pooled", "fedprox") and study.tabular == ("random_forest",)


@pytest.mark.parametrize("raw, key", [
    ({"dataset": "lung", "round": 3}, "'round'"),
    ({}, "'dataset'"),
    ({"dataset": "mnist"}, "'dataset'"),
    ({"dataset": "lung", "seeds": [1, 1]}, "'seeds'"),
    ({"dataset": "lung", "seeds": 0}, "'seeds'"),
    ({"dataset": "lung", "rounds": 0}, "'rounds'"),
    ({"dataset": "lung", "rounds": "3"}, "'rounds'"),
    ({"dataset": "lung", "fusion": "sum"}, "'fusion'"),
    ({"dataset": "lung", "partition": {"how": "random"}}, "'partition.how'"),
    ({"dataset": "lung", "partition": {"alpah": 1.0}}, "'partition.alpah'"),
    ({"dataset": "lung", "training": {"lr": "fast"}}, "'training.lr'"),
    ({"dataset": "lung", "training": {"epochs": 3}}, "'training.epochs'"),
    ({"dataset": "lung", "run-config": {"local-epoch": 3}}, "'run-config.local-epoch'"),
    ({"dataset": "lung", "run-config": {"schema": "x.json"}}, "'run-config.schema'"),
    ({"dataset": "lung", "methods": ["pooled", "fedsgd"]}, "'methods'"),
    ({"dataset": "lung", "methods": ["pooled"], "method": {"x": {"strategy": "fedavg"}}}, "'method.x'"),
    ({"dataset": "lung", "methods": ["x"], "method": {"x": {"strategy": "scaffold"}}}, "'method.x.strategy'"),
    ({"dataset": "lung", "methods": ["x"], "method": {"x": {"sites": "a,b"}}}, "'method.x.sites'"),
    ({"dataset": "lung", "unimodal": ["fedprox"]}, "'unimodal'"),
    ({"dataset": "lung", "tabular": ["xgboost"]}, "'tabular'"),
])
def test_a_wrong_study_names_the_key(raw: dict, key: str) -> None:
    with pytest.raises(StudyError, match=key) as err:
        parse_study(raw, "study.toml")
    assert str(err.value).startswith("study.toml: ")


def test_privacy_and_secure_variants_exist_exactly_when_the_run_config_has_their_keys() -> None:
    assert ("fedavg-dp" in BUILTIN_METHODS) == ("dp-mode" in DEFAULTS)
    assert ("fedavg-secagg" in BUILTIN_METHODS) == ("secure-aggregation" in DEFAULTS)
    for overrides in BUILTIN_METHODS.values():
        assert set(overrides) <= set(DEFAULTS)


@pytest.mark.parametrize("name", ["study-ovarian.toml", "study-wdbc.toml"])
def test_the_documented_example_studies_parse(name: str) -> None:
    study = load_study(EXAMPLES / name)

    assert len(study.seeds) >= 2 and {"pooled", "local-only", "fedavg"} <= {m.name for m in study.methods}


def test_load_study_reports_bad_toml_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("dataset = lung\n")
    with pytest.raises(StudyError, match="not valid TOML"):
        load_study(bad)
    with pytest.raises(StudyError, match="not found"):
        load_study(tmp_path / "missing.toml")


def test_cli_experiment_rejects_a_bad_study_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    study = tmp_path / "study.toml"
    study.write_text('dataset = "lung"\n[partition]\nhow = "iid"\nnum-site = 3\n')

    assert main(["experiment", str(study), "--out", str(tmp_path / "out")]) == 2
    assert "'partition.num-site'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- summaries


def _rows() -> list[dict]:
    """Two seeds x two sites; site B's AUC is undefined (NaN) in seed 1."""
    values = {("fedavg", 0, "A"): 0.8, ("fedavg", 0, "B"): 0.6, ("fedavg", 1, "A"): 0.7, ("fedavg", 1, "B"): math.nan,
              ("pooled", 0, "A"): 0.9, ("pooled", 0, "B"): 0.7, ("pooled", 1, "A"): 0.8, ("pooled", 1, "B"): 0.6}
    family = {"fedavg": "federated", "pooled": "baseline"}
    return [{"seed": s, "method": m, "family": family[m], "site": site, "modalities": "image+clinical", "auc": v}
            for (m, s, site), v in values.items()]


def test_ended_early_lines_give_one_line_per_method_with_its_seeds_and_reason(tmp_path: Path) -> None:
    record = StudyRecord(study=parse_study({"dataset": "lung"}), out_dir=tmp_path)
    assert ended_early_lines(record) == []
    why = "round 1: every site that answered refused to train (privacy policy or budget)"
    record.ended_early = [{"seed": "0", "method": "fedavg-dp", "why": why},
                          {"seed": "1", "method": "fedavg-dp", "why": why},
                          {"seed": "1", "method": "fedprox-tuned mu-0.01", "why": "round 3: budget"}]

    assert ended_early_lines(record) == [f"fedavg-dp ended early (seeds 0, 1): {why}",
                                         "fedprox-tuned mu-0.01 ended early (seed 1): round 3: budget"]


def test_summary_is_the_mean_and_sd_over_seeds_of_the_mean_over_sites() -> None:
    rows = _rows()

    summary = {s["method"]: s for s in summarise(rows, "auc")}

    assert per_seed_means(rows, "fedavg", "auc") == pytest.approx({0: 0.7, 1: 0.7})  # NaN site skipped
    assert summary["fedavg"]["auc_mean"] == pytest.approx(0.7) and summary["fedavg"]["auc_sd"] == pytest.approx(0.0)
    assert summary["pooled"]["auc_mean"] == pytest.approx(0.75)
    assert summary["pooled"]["auc_sd"] == pytest.approx(np.std([0.8, 0.7], ddof=1))
    assert summary["pooled"]["n_seeds"] == 2 and summary["pooled"]["n_sites"] == 2


def test_best_local_only_is_the_site_model_best_on_average_over_all_sites() -> None:
    rows = [{"seed": s, "method": f"local model {k}", "family": "local-cross", "site": site, "model_site": k,
             "modalities": "clinical", "auc": auc}
            for s in (0, 1) for k, scores in {"A": (0.9, 0.5), "B": (0.7, 0.8)}.items()
            for site, auc in zip("AB", scores, strict=True)]

    best = add_best_local(rows, "auc")

    assert best == "B"  # A: mean 0.70 (great at home, poor at B); B: 0.75
    copies = [r for r in rows if r["method"] == "best local-only"]
    assert len(copies) == 4 and {r["model_site"] for r in copies} == {"B"}
    assert per_seed_means(rows, "best local-only", "auc") == pytest.approx({0: 0.75, 1: 0.75})


def test_fusion_table_pairs_fusion_and_best_subset_by_seed() -> None:
    rows = _rows()
    for r in [r for r in rows if r["method"] == "pooled"]:
        for label, shift in (("image only", -0.1), ("clinical only", -0.05)):
            rows.append({**r, "method": f"pooled [{label}]", "family": "unimodal", "base_method": "pooled",
                         "auc": r["auc"] + shift})

    table, bars = fusion_table(summarise(rows, "auc"), rows, "auc", ("image", "clinical"))

    assert len(table) == 1 and table[0]["best subset"] == "clinical only"
    assert table[0]["Δ fusion − best"] == "0.050 ± 0.000" and table[0]["fusion better?"] == "yes"
    assert [b["model"] for b in bars] == ["fusion", "image only", "clinical only"]


# ----------------------------------------------------------------------------------- modality subsets


@pytest.fixture
def two_sites(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Sites A and B in one folder; B has no omics at all, A lacks omics on every third row."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "images").mkdir()
    sites = {}
    for k, site in enumerate("AB"):
        path = make_site(tmp_path / f"tmp{site}", n=30, seed=k)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for name in frame["image"]:
            (root / "images" / f"{site}-{Path(name).name}").write_bytes((path.parent / name).read_bytes())
        frame["image"] = [f"images/{site}-{Path(n).name}" for n in frame["image"]]
        frame["case_id"] = site + frame["case_id"]
        blank = np.ones(len(frame), dtype=bool) if site == "B" else (np.arange(len(frame)) % 3 == 0)
        frame.loc[blank, list(OMICS)] = ""
        sites[site] = root / f"site-{site}.csv"
        frame.to_csv(sites[site], index=False)
    return root, sites


def test_a_modality_subset_keeps_rows_that_have_it_and_leaves_out_sites_without_it(
        schema: Schema, two_sites: tuple[Path, dict[str, Path]]) -> None:
    root, sites = two_sites

    schema_path, kept, skipped = write_modality_subset(schema, root, sites, ("omics",), "only-omics")

    assert list(kept) == ["A.only-omics"] and kept["A.only-omics"] == root / "site-A.only-omics.csv"
    assert "B" in skipped
    frame = pd.read_csv(kept["A.only-omics"], dtype=str, keep_default_na=False)
    assert len(frame) == 20 and (frame["gene0"] != "").all()
    assert load_manifest(kept["A.only-omics"], load_schema(schema_path), check_images=False).schema.modalities == (
        "omics",)


def test_hiding_a_modality_at_test_scores_only_rows_that_keep_another(
        schema: Schema, two_sites: tuple[Path, dict[str, Path]]) -> None:
    _, sites = two_sites
    manifest = load_manifest(sites["A"], schema, check_images=False)
    pre = Preprocessor.fit(manifest)
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion="attention")).eval()
    omics = schema.modalities.index("omics")

    hidden = predict_without(model, pre, manifest, omics)
    full = predict_without(model, pre, manifest, schema.modalities.index("image"))

    n_test = len(MultimodalDataset(manifest, pre, "test"))
    assert hidden is not None and len(hidden.labels) == n_test  # image and clinical remain everywhere
    assert np.allclose(hidden.modality_weights[:, omics], 0.0)
    assert full is not None and not np.allclose(full.probs, hidden.probs)
    assert "auc" in metrics_from(hidden)
