"""A site without a ``split`` column: a seeded stratified split drawn at the site (common/site_split.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedfusion.client.app import make_client_app
from fedfusion.client.site_check import check_site
from fedfusion.common.manifest import ManifestError, load_manifest
from fedfusion.common.site_split import DEFAULT_SPLIT_SEED, site_split
from fedfusion.server.report import write_run_outputs
from tests.dashboard_runs import InProcessGrid, run_in_process, toy_schema
from tests.sitegen import make_site


def _without_split(path: Path) -> Path:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.drop(columns=["split"]).to_csv(path, index=False)
    return path


def test_site_split_sizes_are_stratified_and_seeded() -> None:
    strata = pd.Series(["1"] * 30 + ["0"] * 70)
    split = site_split(strata, seed=4)
    assert split.value_counts().to_dict() == {"train": 72, "test": 20, "val": 8}
    assert ((split == "test") & (strata == "1")).sum() == 6  # 30 % events in the test split too
    assert site_split(strata, seed=4).equals(split)
    assert not site_split(strata, seed=5).equals(split)
    with pytest.raises(ValueError, match="needs at least 3"):
        site_split(pd.Series(["1", "0"]))


def test_manifest_without_split_column_gets_a_split_made_at_the_site(tmp_path: Path) -> None:
    path = _without_split(make_site(tmp_path / "s", n=40, seed=1, with_images=False))
    schema = toy_schema().with_modalities(("clinical", "omics"))
    manifest = load_manifest(path, schema, check_images=False)
    counts = manifest.frame["split"].value_counts().to_dict()
    assert counts == {"train": 29, "test": 8, "val": 3}
    assert manifest.split_note == (f"made at the site (no split column), seed {DEFAULT_SPLIT_SEED}, "
                                   "stratified on label")
    again = load_manifest(path, schema, check_images=False)
    assert again.frame["split"].equals(manifest.frame["split"])  # every message sees the same split
    other = load_manifest(path, schema, check_images=False, split_seed=9)
    assert not other.frame["split"].equals(manifest.frame["split"])


def test_tiny_site_without_split_column_is_a_clear_error(tmp_path: Path) -> None:
    path = _without_split(make_site(tmp_path / "s", n=2, seed=1, with_images=False))
    with pytest.raises(ManifestError, match="no 'split' column and 2 row.*add a split column"):
        load_manifest(path, toy_schema().with_modalities(("clinical",)), check_images=False)


def test_site_check_states_the_split_made_at_the_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _without_split(make_site(tmp_path / "s", n=40, seed=1, with_images=False))
    schema_path = toy_schema().with_modalities(("clinical", "omics")).save(tmp_path / "schema.json")
    assert check_site(path, schema_path, check_images=False) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "train=29, val=3, test=8" in out
    assert "made at the site (no split column), seed 0, stratified on label" in out


def test_federation_trains_and_reports_a_site_without_split_column(tmp_path: Path) -> None:
    """Before the fix every message of that site failed (empty test set) and it vanished from the report."""
    schema_path = toy_schema().save(tmp_path / "schema.json")
    run_dir = tmp_path / "run"
    run_config = {"num-server-rounds": 1, "min-sites": 2, "seed": 1, "schema": str(schema_path),
                  "run-dir": str(run_dir), "local-epochs": 1, "local-batch-size": 16, "fusion": "concat",
                  "round-timeout": 60.0}
    node_configs = {}
    for node in (1, 2):
        manifest = make_site(tmp_path / f"site{node}", n=30, seed=node)
        if node == 2:
            _without_split(manifest)
        node_configs[node] = {"manifest": str(manifest), "schema": str(schema_path), "site-id": f"S{node}",
                              "device": "cpu"}
    result = run_in_process(InProcessGrid(make_client_app(run_config), node_configs), run_config)
    trained = {m["site"] for m in result.site_metrics if m["phase"] == "train" and m["round"] == 1}
    assert trained == {"S1", "S2"}
    final = {m["site"]: m for m in result.site_metrics if m["phase"] == "evaluate" and m["round"] == 1}
    assert final["S2"]["num-examples"] == 6  # 20 % of 30 rows: the test split drawn at the site
    report = write_run_outputs(result).read_text()
    s2_row = next(line for line in report.splitlines() if line.startswith("| S2 "))
    assert "6" in s2_row.split("|")[2:][0] or " 6 " in s2_row
