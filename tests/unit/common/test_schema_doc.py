"""docs/schema.md cannot rot: its JSON examples load with the real loader, and it names every key the
loader accepts (the key lists come from the dataclasses ``Schema.from_dict`` / ``_visits_from_dict`` /
``_image_from_dict`` in common/config.py check against, so a new key without documentation fails here)."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from fedfusion.common.config import ClinicalColumn, ConfigError, ImageSpec, Schema, VisitSpec, load_schema

DOC = Path(__file__).resolve().parents[3] / "docs" / "schema.md"
_JSON_BLOCK = re.compile(r"^```json\n(.*?)^```$", re.S | re.M)


def _json_blocks() -> list[str]:
    return _JSON_BLOCK.findall(DOC.read_text(encoding="utf-8"))


def _documented_keys() -> set[str]:
    """Keys written as inline code in the doc: `name`, `time_column`, ..."""
    return set(re.findall(r"`([a-z_]+)`", DOC.read_text(encoding="utf-8")))


def test_the_doc_has_a_survival_and_a_classification_example() -> None:
    tasks = sorted(json.loads(block)["task"] for block in _json_blocks())
    assert tasks == ["classification", "survival"]


@pytest.mark.parametrize("index", range(2))
def test_every_json_example_loads_with_the_real_loader(index: int, tmp_path: Path) -> None:
    blocks = _json_blocks()
    path = tmp_path / "schema.json"
    path.write_text(blocks[index], encoding="utf-8")
    schema = load_schema(path)
    assert schema.to_dict()["name"] == json.loads(blocks[index])["name"]
    if schema.has_survival:
        assert schema.modalities == ("clinical", "omics")
        assert schema.time_column == "time_days"
        assert [c.kind for c in schema.clinical] == ["numeric", "categorical", "categorical"]
        assert schema.categorical_columns[0].categories == ("optimal", "suboptimal")
        assert len(schema.omics) == 3
    else:
        assert schema.modalities == ("image", "clinical")
        assert schema.classes == ("benign", "malignant")
        assert schema.image is not None and schema.image.shape == (1, 64, 64)
        assert schema.clinical[0].kind == "numeric"  # the documented default


def test_the_doc_names_every_key_the_loader_accepts() -> None:
    # Schema.from_dict accepts exactly the fields of Schema; the nested readers those of VisitSpec,
    # ImageSpec and the keys of a clinical entry (name, kind, categories = ClinicalColumn's fields).
    accepted = {f.name for cls in (Schema, VisitSpec, ImageSpec, ClinicalColumn) for f in fields(cls)}
    missing = sorted(accepted - _documented_keys())
    assert not missing, f"docs/schema.md does not mention loader key(s) {missing}"


def test_the_key_list_is_what_the_loader_enforces(tmp_path: Path) -> None:
    """If the loader ever accepts keys beyond Schema's fields, the derivation above is wrong: catch it."""
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"name": "x", "task": "survival", "omics": ["g"], "undocumented": 1}))
    with pytest.raises(ConfigError, match=r"unknown schema keys \['undocumented'\]") as err:
        load_schema(path)
    assert all(f.name in str(err.value) for f in fields(Schema))
