"""``fedfusion site init``: a hospital export -> proposed schema + manifest, guesses printed, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfusion.client.site_init import SiteInitError, init_site, propose
from fedfusion.cli import main
from fedfusion.common.config import load_schema
from fedfusion.common.manifest import load_manifest


def hospital_export(path: Path, n: int = 80, seed: int = 0, stages: tuple[str, ...] = ("I", "II", "III", "IV"),
                    sep: str = ",") -> Path:
    """What a hospital's research export looks like: its own column names, blanks, text categories."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "patient_id": [f"H{seed}-{i:04d}" for i in range(n)],
        "age": rng.normal(62, 9, n).round(1),
        "sex": rng.choice(["F", "M"], n),
        "stage": rng.choice(list(stages), n),
        "tumour_size": rng.normal(31, 8, n).round(1),
        "time_months": rng.uniform(1, 120, n).round(1),
        "death": (rng.uniform(size=n) < 0.4).astype(int),
    })
    frame["tumour_size"] = frame["tumour_size"].astype(object)
    frame.loc[[3, 17], "tumour_size"] = ""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, sep=sep)
    return path


def test_a_survival_export_gets_schema_manifest_and_split(tmp_path: Path) -> None:
    export = hospital_export(tmp_path / "export.csv")
    proposal = init_site(export, tmp_path / "site", seed=3)
    schema = load_schema(tmp_path / "site" / "schema.json")
    assert (schema.task, schema.time_column, schema.event_column) == ("survival", "time_months", "death")
    kinds = {c.name: (c.kind, c.categories) for c in schema.clinical}
    assert kinds == {"age": ("numeric", ()), "sex": ("categorical", ("F", "M")),
                     "stage": ("categorical", ("I", "II", "III", "IV")), "tumour_size": ("numeric", ())}
    assert proposal.id_column == "patient_id"
    manifest = load_manifest(tmp_path / "site" / "manifest.csv", schema)  # what site check will run
    assert manifest.has_split_column and len(manifest) == 80
    assert manifest.summary()["splits"] == {"train": 58, "val": 6, "test": 16} == proposal.split_counts
    assert manifest.frame["case_id"].iloc[0] == "H0-0000"
    text = "\n".join(proposal.lines())
    assert "task: survival, time = time_months, event = death" in text
    assert "stage: categorical ['I', 'II', 'III', 'IV']" in text and "--categorical" in text


def test_classification_overrides_and_dropped_columns(tmp_path: Path) -> None:
    export = hospital_export(tmp_path / "export.csv")
    frame = pd.read_csv(export, dtype=str, keep_default_na=False)
    frame["diagnosis"] = np.where(np.arange(80) % 3 == 0, "malignant", "benign")
    frame["notes"] = [f"free text {i}" for i in range(80)]
    frame["empty"] = ""
    frame.to_csv(export, index=False)
    proposal, manifest = propose(export, label="diagnosis", categorical=("death",), drop=("time_months",))
    schema = proposal.schema
    assert (schema.task, schema.label_column, schema.classes) == ("classification", "diagnosis",
                                                                  ("benign", "malignant"))
    assert {c.name: c.kind for c in schema.clinical}["death"] == "categorical"
    assert "time_months" not in manifest.columns
    assert set(proposal.dropped) == {"notes", "empty"}
    test = manifest[manifest["split"] == "test"]["diagnosis"].value_counts().to_dict()
    assert test == {"benign": 11, "malignant": 5}  # stratified: 27 of 80 malignant -> 5 of 16


def test_a_second_hospital_merges_into_the_shared_schema(tmp_path: Path) -> None:
    shared = tmp_path / "sites" / "schema.json"
    init_site(hospital_export(tmp_path / "a.csv", stages=("I", "II")), tmp_path / "sites" / "a", schema_path=shared)
    proposal = init_site(hospital_export(tmp_path / "b.csv", seed=1, stages=("II", "III", "IV")),
                         tmp_path / "sites" / "b", schema_path=shared)
    assert proposal.merged_into == shared
    stage = next(c for c in load_schema(shared).clinical if c.name == "stage")
    assert stage.categories == ("I", "II", "III", "IV")
    other = hospital_export(tmp_path / "c.csv", seed=2)
    pd.read_csv(other).rename(columns={"age": "age_years"}).to_csv(other, index=False)
    with pytest.raises(SiteInitError, match=r"only in the schema \['age'\], only in this export \['age_years'\]"):
        init_site(other, tmp_path / "sites" / "c", schema_path=shared)


def test_semicolon_exports_are_read(tmp_path: Path) -> None:
    proposal, _ = propose(hospital_export(tmp_path / "export.csv", sep=";"))
    assert proposal.delimiter == ";" and proposal.schema.task == "survival"


def test_unreadable_exports_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SiteInitError, match="file not found"):
        propose(tmp_path / "missing.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("patient_id,age,time,event\nA,60,3,1\nB\xe9,61,4,0\n".encode("latin-1"))
    with pytest.raises(SiteInitError, match=r"line 3: not UTF-8 text .*CSV UTF-8"):
        propose(latin)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SiteInitError, match="the file is empty"):
        propose(empty)
    no_task = tmp_path / "no_task.csv"
    pd.DataFrame({"patient_id": ["a", "b", "c"], "age": [1, 2, 3], "weight": [4, 5, 6]}).to_csv(no_task, index=False)
    with pytest.raises(SiteInitError, match="cannot tell the task.*--time COL --event COL"):
        propose(no_task)


def test_cli_prints_the_guesses_and_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = hospital_export(tmp_path / "export.csv")
    assert main(["site", "init", str(export), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "please confirm" in out and "id column: patient_id" in out and "next: fedfusion site check" in out
    assert main(["site", "init", str(export), "--out", str(tmp_path / "s")]) == 2  # exists, no --force
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --force" in err and "Traceback" not in err
