"""``--sites-dir`` / study ``sites-dir``: a researcher's own site folders become the simulation's data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fedfusion.cli import main
from fedfusion.common.manifest import ManifestError, load_manifest
from fedfusion.simulations.experiment import StudyError, parse_study
from fedfusion.simulations.user_sites import SitesDirError, prepare_user_sites, split_lines
from tests.sitegen import make_sites_dir, survival_schema


def test_prepare_writes_pooled_and_site_manifests_with_the_sites_splits(tmp_path: Path) -> None:
    sites_dir = make_sites_dir(tmp_path / "sites", {"north": 60, "south": 80, "west": 100}, split_at=("west",))
    schema_path, sites = prepare_user_sites(sites_dir, tmp_path / "data", seed=5)
    assert list(sites) == ["north", "south", "west"]
    schema = survival_schema()
    pooled = load_manifest(tmp_path / "data" / "manifest.csv", schema)
    assert len(pooled) == 240 and pooled.frame["site"].value_counts().to_dict() == {"west": 100, "south": 80,
                                                                                    "north": 60}
    north = load_manifest(sites["north"], schema)
    drawn_at_site = load_manifest(sites_dir / "north" / "manifest.csv", schema, split_seed=5)
    assert north.frame["split"].tolist() == drawn_at_site.frame["split"].tolist()  # the site's own seeded split
    assert north.summary()["splits"] == {"train": 43, "val": 5, "test": 12}
    assert load_manifest(sites["west"], schema).summary()["splits"] == {"train": 80, "val": 0, "test": 20}
    lines = "\n".join(split_lines(tmp_path / "data"))
    assert "| north | 43 | 5 | 12 |" in lines
    assert "made at the site (no split column), seed 5, stratified on death" in lines
    assert "| west | 80 | 0 | 20 |" in lines and "from the manifest's split column" in lines
    assert json.loads((tmp_path / "data" / "splits.json").read_text())["sites"]["south"]["test"] == 16
    assert not (sites_dir / "north" / "split.csv").exists() and sorted(p.name for p in (sites_dir / "north").iterdir()) \
        == ["manifest.csv"]  # the user's folder is only read


def test_layout_and_data_problems_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SitesDirError, match="not a folder"):
        prepare_user_sites(tmp_path / "nope", tmp_path / "data", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SitesDirError, match="no schema.json; write one with `fedfusion site init"):
        prepare_user_sites(tmp_path / "empty", tmp_path / "data", 0)
    one = make_sites_dir(tmp_path / "one", {"a": 30})
    with pytest.raises(SitesDirError, match="found 1 site folder.*at least 2"):
        prepare_user_sites(one, tmp_path / "data", 0)
    bad = make_sites_dir(tmp_path / "bad", {"a": 30, "b": 30})
    frame = pd.read_csv(bad / "b" / "manifest.csv", dtype=str)
    frame.loc[4, "death"] = "yes"
    frame.to_csv(bad / "b" / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match=r"b/manifest.csv, line 6, case 'b-004', column 'death'"):
        prepare_user_sites(bad, tmp_path / "data", 0)


def test_simulate_sites_dir_problems_exit_2_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--sites-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a folder" in err and err.count("\n") == 1
    one = make_sites_dir(tmp_path / "one", {"a": 30})
    assert main(["simulate", "--sites-dir", str(one), "--out", str(tmp_path / "run")]) == 2
    assert "found 1 site folder" in capsys.readouterr().err


def test_study_key_sites_dir(tmp_path: Path) -> None:
    sites_dir = make_sites_dir(tmp_path / "sites", {"a": 30, "b": 30})
    study = parse_study({"sites-dir": "sites", "methods": ["pooled", "fedavg"]}, str(tmp_path / "study.toml"))
    assert study.sites_dir == str(sites_dir.resolve()) and study.name == "sites-natural"
    with pytest.raises(StudyError, match="'sites-dir' and 'dataset' are both given"):
        parse_study({"sites-dir": "sites", "dataset": "ovarian"}, str(tmp_path / "study.toml"))
    with pytest.raises(StudyError, match="'sites-dir' = 'missing': no such folder"):
        parse_study({"sites-dir": "missing"}, str(tmp_path / "study.toml"))
