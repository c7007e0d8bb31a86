"""Schema files: round trip, and clear errors naming the file and the setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfusion.common.config import ConfigError, ModelConfig, Schema, TrainConfig, from_flat, load_schema


def test_schema_round_trip(schema: Schema, tmp_path: Path) -> None:
    path = schema.save(tmp_path / "schema.json")
    assert load_schema(path) == schema
    assert schema.modalities == ("image", "clinical", "omics")
    assert schema.clinical_width == 4  # two numeric columns, each value + missing flag


def test_with_modalities_restricts(schema: Schema) -> None:
    assert schema.with_modalities(["image"]).modalities == ("image",)
    with pytest.raises(ConfigError, match="no modality"):
        schema.with_modalities(["omics"]).with_modalities(["image"])


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"name": "x", "task": "regression", "omics": ["g"]}, "task must be one of"),
        ({"name": "x", "task": "classification", "classes": ["a"], "omics": ["g"]}, "at least 2 classes"),
        ({"name": "x", "task": "survival"}, "at least one of image, clinical or omics"),
        ({"name": "x", "task": "survival", "clinical": [{"name": "c", "kind": "categorical"}]}, "needs a list"),
        ({"name": "x", "task": "survival", "omics": ["g"], "colour": 1}, "unknown schema keys"),
        ({"name": "x", "task": "survival", "image": {"channels": 2}}, "channels must be 1 or 3"),
    ],
)
def test_bad_schema_names_file_and_setting(tmp_path: Path, raw: dict, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as caught:
        load_schema(path)
    assert needle in str(caught.value) and "bad.json" in str(caught.value)


def test_schema_not_json(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text("{oops")
    with pytest.raises(ConfigError, match="line 1"):
        load_schema(path)


def test_flat_run_config_maps_hyphens() -> None:
    cfg = from_flat(TrainConfig, {"local-epochs": 3, "local-batch-size": 16, "num-server-rounds": 5}, prefix="local-")
    assert (cfg.epochs, cfg.batch_size) == (3, 16)
    assert from_flat(ModelConfig, {"fusion": "gated", "embed-dim": 32}).embed_dim == 32
    with pytest.raises(ConfigError, match="modality-dropout"):
        ModelConfig(modality_dropout=1.5)
