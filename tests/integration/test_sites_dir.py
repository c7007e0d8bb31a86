"""Bring your own data, end to end in Flower's simulation runtime: three site folders with no split
column reach a federated vs pooled vs local-only report (``simulate --sites-dir``) and a study
(``experiment`` with ``sites-dir``), each stating the split every site made."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedfusion.cli import main
from tests.sitegen import make_sites_dir

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

SIZES = {"north": 60, "south": 80, "west": 100}  # test splits drawn at the sites: 12, 16, 20 cases


def test_simulate_sites_dir_reports_every_method_and_the_split(tmp_path: Path) -> None:
    sites = make_sites_dir(tmp_path / "sites", SIZES)
    out = tmp_path / "run"
    assert main(["simulate", "--sites-dir", str(sites), "--rounds", "2", "--local-epochs", "1",
                 "--baseline-epochs", "3", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Partition `natural`: your sites (--sites-dir)." in report
    header = next(line for line in report.splitlines() if line.startswith("| site |"))
    assert all(m in header for m in ("federated (fedavg)", "pooled", "local-only"))
    for site, n in SIZES.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {site} |") and "made at" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == str(round(n * 0.2))  # test n
        assert cells[-1] == "made at the site (no split column), seed 0, stratified on death"
        scores = next(line for line in report.splitlines() if line.startswith(f"| {site} |") and line != row)
        named = dict(zip([h.strip() for h in header.strip("|").split("|")],
                         [c.strip() for c in scores.strip("|").split("|")], strict=True))
        for method in ("federated (fedavg)", "pooled", "local-only"):
            assert 0.0 <= float(named[method]) <= 1.0, (site, method, named)


def test_experiment_with_sites_dir(tmp_path: Path) -> None:
    make_sites_dir(tmp_path / "sites", SIZES)
    study = tmp_path / "study.toml"
    study.write_text('name = "mine"\nsites-dir = "sites"\nseeds = [3]\nrounds = 1\nlocal-epochs = 1\n'
                     'methods = ["pooled", "local-only", "fedavg"]\ntabular = false\n\n'
                     '[training]\nbaseline-epochs = 2\n')
    out = tmp_path / "out"
    assert main(["experiment", str(study), "--out", str(out)]) == 0
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for method in ("pooled", "local-only", "fedavg"):
        got = {r["site"]: float(r["n_test"]) for r in rows if r["method"] == method}
        assert got == {site: round(n * 0.2) for site, n in SIZES.items()}, method
    report = (out / "report.md").read_text()
    assert f"Sites: the sub-folders of `{(tmp_path / 'sites').resolve()}`" in report
    assert "seed 3, stratified on death" in (out / "runs" / "seed-3" / "data" / "splits.json").read_text()
