"""``fedfusion experiment`` end to end on the shipped ``lung`` data (3 simulated sites, Flower's
simulation runtime): 2 seeds x {pooled, local-only, fedavg}, one round. The summary is FLamby's
mean over seeds of the mean over sites, the report names every method, and the federated rows --
what the sites reported -- match the saved global model rescored on each site's test split."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedfusion.cli import main
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.manifest import load_manifest
from fedfusion.simulations.explain import find_sites, load_global_model, score, split_tensors

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

STUDY = """
name = "lung-tiny"
dataset = "lung"
seeds = [0, 1]
rounds = 1
local-epochs = 1
methods = ["pooled", "local-only", "fedavg"]
tabular = false

[partition]
how = "iid"
num-sites = 3

[training]
baseline-epochs = 2
"""


def _read(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_a_tiny_study_writes_consistent_results_and_reports(tmp_path: Path) -> None:
    study = tmp_path / "study.toml"
    study.write_text(STUDY)
    out = tmp_path / "out"

    assert main(["experiment", str(study), "--out", str(out)]) == 0

    rows = _read(out / "results.csv")
    methods = ("pooled", "local-only", "fedavg", "best local-only")
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        assert len(mine) == 2 * 3, method  # seed x site
        per_seed = [np.nanmean([float(r["c_index"]) for r in mine if r["seed"] == s]) for s in ("0", "1")]
        summary = {r["method"]: r for r in _read(out / "summary.csv")}[method]
        assert float(summary["c_index_mean"]) == pytest.approx(np.mean(per_seed))
        assert float(summary["c_index_sd"]) == pytest.approx(np.std(per_seed, ddof=1))
        assert 0.3 < float(summary["c_index_mean"]) < 1.0
    as_json = json.loads((out / "summary.json").read_text())
    assert as_json["methods"]["fedavg"]["mean"] == pytest.approx(float(
        {r["method"]: r for r in _read(out / "summary.csv")}["fedavg"]["c_index_mean"]))
    assert sorted({int(r["round"]) for r in _read(out / "rounds.csv")}) == [0, 1]

    report, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for method in methods:
        assert f"| {method} |" in report and f"<td>{method}</td>" in page
    for plot in ("rounds_c_index.png", "sites_c_index.png", "vs_local_c_index.png", "km.png"):
        assert (out / "plots" / plot).stat().st_size > 1000 and f"plots/{plot}" in report
    assert page.count('src="data:image/png;base64,') == 4  # self-contained: nothing fetched when opened
    assert "no per-case predictions recorded" not in report.split("### Paired")[0]  # every main method has them
    fair = [r for r in rows if r["method"] == "best local-only (val-chosen)"]
    assert len(fair) == 2 * 3 and any(not math.isnan(float(r["val_c_index"])) for r in fair)  # chosen on val
    assert {r["site"] for r in _read(out / "site_counts.csv")} == {r["site"] for r in rows}
    assert "<script" not in page and "<link" not in page and 'src="http' not in page

    # The sites' own numbers are reproducible from the saved global model (what `explain` loads).
    run = out / "runs" / "seed-1" / "fedavg"
    loaded = load_global_model(run / "model.pt")
    for site, path in find_sites(loaded, run).items():
        manifest = load_manifest(path, loaded.schema, check_images=False)
        tensors = split_tensors(MultimodalDataset(manifest, Preprocessor.fit(manifest), "test"))
        reported = next(float(r["c_index"]) for r in rows
                        if r["method"] == "fedavg" and r["seed"] == "1" and r["site"] == site)
        rescored = score(loaded.model, tensors, loaded.schema)["c_index"]
        assert math.isclose(rescored, reported, abs_tol=1e-6), site


REFUSED_STUDY = """
name = "lung-refused"
dataset = "lung"
seeds = [0]
rounds = 2
local-epochs = 1
methods = ["fedavg-dp"]
tabular = false
ablation = false
unimodal = false

[partition]
how = "iid"
num-sites = 3

[run-config]
sim-privacy-policy = "{policy}"
"""


def test_a_study_whose_every_site_refuses_writes_its_report_then_exits_1_naming_the_method(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """fedavg-dp asks for ε = 8; every simulated site allows 0.01, so all refuse round 1 and the federation
    ends early: the report is still written, and the command exits 1 like ``simulate`` does."""
    policy = tmp_path / "policy.toml"
    policy.write_text("[privacy]\nmax-epsilon = 0.01\n")
    study = tmp_path / "study.toml"
    study.write_text(REFUSED_STUDY.format(policy=policy))
    out = tmp_path / "out"

    assert main(["experiment", str(study), "--out", str(out)]) == 1

    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: fedavg-dp ended early (seed 0): round 1: every site that answered refused")
    ended = json.loads((out / "summary.json").read_text())["ended_early"]
    assert [(e["seed"], e["method"]) for e in ended] == [("0", "fedavg-dp")]
    report = (out / "report.md").read_text()
    assert "seed 0, fedavg-dp: round 1: every site that answered refused" in report
    assert "| fedavg-dp |" in report  # scored: the initial global model, the only one there is
    assert sorted({int(r["round"]) for r in _read(out / "rounds.csv")}) == [0, 1]
