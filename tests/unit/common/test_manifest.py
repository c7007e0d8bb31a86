"""Every bad manifest is a ManifestError whose lines name file, line, case and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfusion.common.config import ConfigError, Schema
from fedfusion.common.manifest import ManifestError, load_manifest


def _edit(path: Path, row: int, column: str, value: object) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(path, index=False)


def _only_issue(path: Path, schema: Schema, **kwargs: object) -> str:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, schema, **kwargs)
    assert len(caught.value.issues) == 1, caught.value
    return str(caught.value.issues[0])


def test_valid_manifest_loads_typed_values(site: Path, schema: Schema) -> None:
    manifest = load_manifest(site, schema)
    assert len(manifest) == 40
    assert manifest.frame["age"].dtype == float
    assert manifest.frame["size_mm"].isna().sum() == 6  # rows 0, 7, 14, 21, 28, 35 are blank
    assert manifest.frame["grade"].isna().sum() == 5
    assert all(Path(p).is_file() for p in manifest.frame["image"])
    summary = manifest.summary()
    assert summary["labels"] == {"benign": 20, "malignant": 20}
    assert summary["splits"] == {"train": 24, "val": 8, "test": 8}
    assert summary["modality_coverage"] == {"image": 1.0, "clinical": 1.0, "omics": 1.0}


def test_missing_file(tmp_path: Path, schema: Schema) -> None:
    message = _only_issue(tmp_path / "nope.csv", schema)
    assert "nope.csv" in message and "not found" in message


def test_duplicate_case_id_names_both_lines(site: Path, schema: Schema) -> None:
    _edit(site, 5, "case_id", "P001")
    message = _only_issue(site, schema)
    assert "line 7" in message and "'case_id'" in message and "first seen on line 3" in message


def test_unknown_label(site: Path, schema: Schema) -> None:
    _edit(site, 3, "label", "cancer")
    message = _only_issue(site, schema)
    assert str(site) in message and "line 5" in message and "case 'P003'" in message
    assert "column 'label'" in message and "'cancer'" in message and "benign" in message


def test_non_numeric_clinical_value(site: Path, schema: Schema) -> None:
    _edit(site, 10, "age", "fifty")
    message = _only_issue(site, schema)
    assert "line 12" in message and "column 'age'" in message and "'fifty' is not a number" in message


def test_unknown_category(site: Path, schema: Schema) -> None:
    _edit(site, 2, "grade", "G7")
    message = _only_issue(site, schema)
    assert "line 4" in message and "column 'grade'" in message and "'G7'" in message and "G3" in message


@pytest.mark.parametrize("column", ["time", "event"])
def test_missing_time_or_event(site: Path, schema: Schema, column: str) -> None:
    _edit(site, 4, column, "")
    message = _only_issue(site, schema)
    assert "line 6" in message and f"column '{column}'" in message and "missing value" in message


def test_bad_event_and_time_values(site: Path, schema: Schema) -> None:
    _edit(site, 4, "event", "2")
    _edit(site, 6, "time", "-3")
    with pytest.raises(ManifestError) as caught:
        load_manifest(site, schema)
    text = str(caught.value)
    assert "line 6" in text and "not 0 or 1" in text
    assert "line 8" in text and "not positive" in text


def test_image_path_outside_manifest_folder(site: Path, schema: Schema, tmp_path: Path) -> None:
    (tmp_path / "secret.png").write_bytes((site.parent / "images" / "case000.png").read_bytes())
    _edit(site, 0, "image", "../secret.png")
    message = _only_issue(site, schema)
    assert "line 2" in message and "column 'image'" in message and "outside the manifest folder" in message


def test_missing_image_file(site: Path, schema: Schema) -> None:
    _edit(site, 8, "image", "images/missing.png")
    message = _only_issue(site, schema)
    assert "line 10" in message and "not found" in message


def test_unreadable_image(site: Path, schema: Schema) -> None:
    (site.parent / "images" / "case011.png").write_bytes(b"this is not a png")
    message = _only_issue(site, schema)
    assert "line 13" in message and "column 'image'" in message and "unreadable" in message
    # The cheap check skips opening images; training would then report the file itself.
    assert len(load_manifest(site, schema, check_images=False)) == 40


def test_wrong_image_shape(site: Path, schema: Schema) -> None:
    np.save(site.parent / "images" / "cube.npy", np.zeros((4, 8, 8, 8), dtype=np.float32))
    _edit(site, 12, "image", "images/cube.npy")
    message = _only_issue(site, schema)
    assert "line 14" in message and "shape" in message


def test_empty_site(tmp_path: Path, site: Path, schema: Schema) -> None:
    header = site.read_text().splitlines()[0]
    empty = tmp_path / "empty.csv"
    empty.write_text(header + "\n")
    message = _only_issue(empty, schema)
    assert "empty.csv" in message and "no patient rows" in message


def test_site_without_training_rows(site: Path, schema: Schema) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame["split"] = "test"
    frame.to_csv(site, index=False)
    message = _only_issue(site, schema)
    assert "column 'split'" in message and "no rows in the 'train' split" in message


def test_single_class_site(site: Path, schema: Schema) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame["label"] = "benign"
    frame.to_csv(site, index=False)
    message = _only_issue(site, schema)
    assert "column 'label'" in message and "single-class" in message
    assert len(load_manifest(site, schema, allow_single_class=True)) == 40


def test_missing_required_column(site: Path, schema: Schema) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False).drop(columns=["gene3"])
    frame.to_csv(site, index=False)
    message = _only_issue(site, schema)
    assert "missing required column" in message and "gene3" in message


def test_bad_split_value(site: Path, schema: Schema) -> None:
    _edit(site, 9, "split", "training")
    message = _only_issue(site, schema)
    assert "line 11" in message and "'training'" in message


def test_all_problems_reported_at_once(site: Path, schema: Schema) -> None:
    _edit(site, 1, "label", "??")
    _edit(site, 2, "age", "x")
    _edit(site, 3, "grade", "G9")
    _edit(site, 4, "gene2", "high")
    with pytest.raises(ManifestError) as caught:
        load_manifest(site, schema)
    assert sorted(issue.line for issue in caught.value.issues) == [3, 4, 5, 6]
    assert {issue.column for issue in caught.value.issues} == {"label", "age", "grade", "gene2"}


def test_missing_modalities_are_allowed(site: Path, schema: Schema) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame.loc[0:9, "image"] = ""
    frame.loc[5:14, [f"gene{i}" for i in range(6)]] = ""
    frame.to_csv(site, index=False)
    manifest = load_manifest(site, schema)
    present = manifest.modality_present()
    assert present["image"].sum() == 30 and present["omics"].sum() == 30 and present["clinical"].all()


def test_a_case_with_no_modality_at_all_is_refused_with_its_line(site: Path, schema: Schema) -> None:
    """The model cannot use a case whose every modality is blank: refuse it at check time, not mid-round."""
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame.loc[4, ["image", "age", "size_mm", "grade", *[f"gene{i}" for i in range(6)]]] = ""
    frame.to_csv(site, index=False)
    message = _only_issue(site, schema)
    assert "line 6" in message and "case 'P004'" in message and "no data in any modality" in message
    assert "['image', 'clinical', 'omics']" in message


def test_an_entirely_empty_clinical_column_is_an_error_naming_file_and_column(site: Path, schema: Schema) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame["size_mm"] = ["", "NA", "nan", " "] * 10  # every spelling of "missing"
    frame.to_csv(site, index=False)
    message = _only_issue(site, schema)
    assert message.startswith(f"{site}, column 'size_mm': no value in any of the 40 rows")


def test_a_column_the_schema_says_may_be_absent_is_only_a_warning_when_empty(site: Path, schema: Schema) -> None:
    """A cohort that never recorded a variable (breast-cohorts' gse3143: no age, grade, node status)."""
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame["size_mm"] = ""
    frame.to_csv(site, index=False)
    raw = schema.to_dict()
    for column in raw["clinical"]:
        if column["name"] == "size_mm":
            column["may_be_absent"] = True
    declared = Schema.from_dict(raw)
    assert Schema.from_dict(declared.to_dict()) == declared  # the flag survives a schema round trip
    manifest = load_manifest(site, declared)
    assert any("'size_mm' is empty in all 40 rows" in w and "may_be_absent" in w for w in manifest.warnings)
    raw["clinical"][0]["may_be_absent"] = "yes"
    with pytest.raises(ConfigError, match="'may_be_absent' must be true or false"):
        Schema.from_dict(raw)


def test_a_mostly_empty_column_is_a_warning_and_a_site_without_a_modality_is_not_an_error(
        site: Path, schema: Schema) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame.loc[0:29, "age"] = ""  # 30 of 40 empty: 75 %
    frame[[f"gene{i}" for i in range(6)]] = ""  # this site has no omics at all
    frame.to_csv(site, index=False)
    manifest = load_manifest(site, schema)
    assert any("'age' 75% of 40 rows" in w for w in manifest.warnings), manifest.warnings
    assert any("every omics column is empty" in w for w in manifest.warnings), manifest.warnings


def test_a_latin1_file_names_each_line_column_and_bytes_and_says_save_as_utf8(site: Path, schema: Schema) -> None:
    text = site.read_text().splitlines()
    text[3] = text[3].replace("P002", "Pé02", 1)
    text[7] = text[7].replace("P006", "P006ü", 1)
    site.write_bytes(("\n".join(text) + "\n").encode("cp1252"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(site, schema)
    issues = caught.value.issues
    assert [(i.line, i.column) for i in issues] == [(4, "case_id"), (8, "case_id")]
    assert "b'\\xe9'" in issues[0].message and "'é'" in issues[0].message
    assert "b'\\xfc'" in issues[1].message
    assert all("save the file as UTF-8 (Excel: Save As > CSV UTF-8)" in i.message for i in issues)


@pytest.mark.parametrize(("separator", "named"), [(";", "';'-separated"), ("\t", "tab-separated")])
def test_a_file_separated_by_another_character_says_so_once(site: Path, schema: Schema, separator: str,
                                                            named: str) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame.to_csv(site, index=False, sep=separator)
    message = _only_issue(site, schema)
    assert "line 1" in message and f"the file looks {named}; export with ','" in message
    assert "missing required column" not in message


def test_problems_are_listed_in_line_then_column_order(site: Path, schema: Schema) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame.loc[7, "grade"] = "G9"
    frame.loc[7, "age"] = "old"
    frame.loc[2, "gene3"] = "high"
    frame.loc[2, "label"] = "maybe"
    frame.to_csv(site, index=False)
    with pytest.raises(ManifestError) as caught:
        load_manifest(site, schema)
    columns = list(frame.columns)
    found = [(i.line, i.column) for i in caught.value.issues]
    assert found == sorted(found, key=lambda lc: (lc[0], columns.index(lc[1])))
    assert [line for line, _ in found] == [4, 4, 9, 9]
