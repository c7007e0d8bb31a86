"""Multi-sequence imaging: several image modalities per case (``image:t1``, ``image:flair``), separate
or shared encoders, manifest validation per sequence, dataset keys, and federation per sequence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from PIL import Image

from fedfusion.common.config import (
    ConfigError,
    ImageSpec,
    ModelConfig,
    Schema,
    is_modality,
    load_schema,
    modality_kind,
)
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.manifest import ManifestError, load_manifest
from fedfusion.common.models import create_model, parameter_group
from fedfusion.common.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    SITE_KEY,
    arrays_to_numpy,
    is_modality_count_key,
    modality_count,
    numpy_to_arrays,
)
from fedfusion.server.strategy import build_strategy, modality_weighted_average

RAW = {
    "name": "mri",
    "task": "classification",
    "classes": ["low", "high"],
    "clinical": [{"name": "age"}],
    "images": [{"name": "t1", "column": "t1_path", "size": [16, 16]},
               {"name": "flair", "size": [16, 16]}],
}


@pytest.fixture
def schema() -> Schema:
    return Schema.from_dict(RAW)


def test_schema_lists_one_modality_per_sequence_and_round_trips(schema: Schema, tmp_path: Path) -> None:
    assert schema.modalities == ("image:t1", "image:flair", "clinical")
    assert [s.column for s in schema.image_specs.values()] == ["t1_path", "image_flair"]  # default column
    assert schema.image is None
    path = schema.save(tmp_path / "schema.json")
    assert load_schema(path) == schema
    assert json.loads(path.read_text())["images"][1] == {"name": "flair", "column": "image_flair",
                                                         "size": [16, 16], "channels": 1}
    only = schema.with_modalities(["image:flair", "clinical"])
    assert only.modalities == ("image:flair", "clinical")
    # a one-image schema is unchanged: no "images" key, modality "image"
    single = Schema.from_dict({"name": "x", "task": "classification", "classes": ["a", "b"], "image": {}})
    assert single.modalities == ("image",) and "images" not in single.to_dict()


@pytest.mark.parametrize(("change", "expected"), [
    ({"image": {"size": [16, 16]}}, "either 'image' (one image per case) or 'images'"),
    ({"images": [{"name": "t1"}, {"name": "t1", "column": "other"}]}, "image sequence names listed twice: ['t1']"),
    ({"images": [{"name": "a", "column": "c"}, {"name": "b", "column": "c"}]}, "image columns listed twice: ['c']"),
    ({"images": [{"name": "t1.gd"}]}, "image sequence name 't1.gd' must be non-empty without '.'"),
    ({"images": [{"column": "x"}]}, "images[0] needs a 'name'"),
    ({"images": [{"name": "t1"}, {"name": "flair", "channels": 2}]}, "image sequence 'flair' channels must be 1 or 3"),
    ({"images": {"name": "t1"}}, "'images' must be a JSON list of objects"),
])
def test_schema_errors_name_the_sequence(change: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Schema.from_dict({**RAW, **change}, source="schema.json")
    assert expected in str(caught.value) and str(caught.value).startswith("schema.json")


def test_modality_names() -> None:
    assert modality_kind("image:t1") == "image" and modality_kind("clinical") == "clinical"
    assert is_modality("image:flair") and is_modality("visits") and is_modality("omics")
    assert not is_modality("image:") and not is_modality("image:a.b") and not is_modality("fusion")
    assert not is_modality("clinical:x")
    with pytest.raises(ValueError, match="'fusion' is not a modality name"):
        modality_kind("fusion")


def _png(path: Path, bright: str) -> str:
    """A 20x24 PNG whose ``bright`` half ("left" or "top") is white, the rest black."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((20, 24), dtype=np.uint8)
    if bright == "left":
        array[:, :12] = 255
    else:
        array[:10] = 255
    Image.fromarray(array).save(path)
    return f"{path.parent.name}/{path.name}"


def _site(tmp_path: Path, rows: int = 8) -> Path:
    """A manifest whose case 2 lacks FLAIR, case 3 lacks T1 and case 5 lacks both."""
    lines = ["case_id,label,age,t1_path,image_flair,split"]  # every case in train: the dataset indexes all 8
    for i in range(rows):
        t1 = "" if i in (3, 5) else _png(tmp_path / "t1" / f"c{i}.png", "left")
        flair = "" if i in (2, 5) else _png(tmp_path / "flair" / f"c{i}.png", "top")
        lines.append(f"C{i},{'low' if i % 2 else 'high'},{50 + i},{t1},{flair},train")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_and_dataset_carry_each_sequence(schema: Schema, tmp_path: Path) -> None:
    manifest = load_manifest(_site(tmp_path), schema)
    present = manifest.modality_present()
    assert list(present.columns) == ["image:t1", "image:flair", "clinical"]
    assert present["image:t1"].tolist() == [True, True, True, False, True, False, True, True]
    assert present["image:flair"].tolist() == [True, True, False, True, True, False, True, True]
    assert manifest.summary()["modality_coverage"] == {"image:t1": 0.75, "image:flair": 0.75, "clinical": 1.0}
    data = MultimodalDataset(manifest, Preprocessor.fit(manifest), "train")
    item = data[1]
    assert item["image:t1"].shape == (1, 16, 16) and item["image:flair"].shape == (1, 16, 16)
    assert item["mask"].tolist() == [True, True, True]
    # each sequence's own file comes through: T1 is bright on the left, FLAIR at the top
    t1, flair = item["image:t1"][0], item["image:flair"][0]
    assert float(t1[:, :8].mean()) > float(t1[:, 8:].mean()) + 0.5
    assert float(flair[:8].mean()) > float(flair[8:].mean()) + 0.5
    assert data[2]["mask"].tolist() == [True, False, True] and float(data[2]["image:flair"].abs().sum()) == 0.0
    assert data[5]["mask"].tolist() == [False, False, True]


def test_bad_sequence_path_names_file_line_case_and_column(schema: Schema, tmp_path: Path) -> None:
    path = _site(tmp_path)
    text = path.read_text().replace("flair/c4.png", "flair/missing.png")
    path.write_text(text)
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, schema)
    [issue] = caught.value.issues
    message = str(issue)
    assert str(path) in message and "line 6" in message and "case 'C4'" in message
    assert "column 'image_flair'" in message and "'flair/missing.png' not found" in message


def test_site_without_a_sequence_column_has_it_missing_everywhere(schema: Schema, tmp_path: Path) -> None:
    path = _site(tmp_path)
    lines = [",".join(line.split(",")[:4]) for line in path.read_text().splitlines()]  # drop image_flair
    path.write_text("\n".join(lines) + "\n")
    manifest = load_manifest(path, schema)
    assert not manifest.modality_present()["image:flair"].any()
    assert any("no 'image_flair' column: no case at this site has a 'flair' image" in w for w in manifest.warnings)


def test_separate_and_shared_parameter_groups(schema: Schema) -> None:
    separate = create_model(schema, ModelConfig(image_encoders="separate", embed_dim=8))
    groups = separate.parameter_groups()
    assert groups["image:t1"] and groups["image:flair"] and groups["image"] == []
    assert all(n.startswith("encoders.image:t1.") for n in groups["image:t1"])
    assert parameter_group("_module.encoders.image:flair.backbone.features.0.weight") == "image:flair"
    assert parameter_group("absent.image:t1.weight") == "fusion"
    shared = create_model(schema, ModelConfig(image_encoders="shared", embed_dim=8))
    sgroups = shared.parameter_groups()
    assert sgroups["image"] and sgroups["image:t1"] == [] and "encoders.image.sequence.weight" in sgroups["image"]
    n_sep = sum(p.numel() for n, p in separate.named_parameters() if n.startswith("encoders.image"))
    n_shared = sum(p.numel() for n, p in shared.named_parameters() if n.startswith("encoders.image"))
    assert n_shared == n_sep // 2 + 2 * 8  # one encoder instead of two, plus a 2 x 8 sequence embedding


def test_shared_encoder_tells_sequences_apart_and_needs_one_shape(schema: Schema) -> None:
    model = create_model(schema, ModelConfig(image_encoders="shared", embed_dim=8)).eval()
    encoder = model.encoders["image"]
    same = torch.randn(3, 1, 16, 16)
    batch = {"image:t1": same, "image:flair": same}
    with torch.no_grad():
        diff = encoder.encode(batch, "image:t1") - encoder.encode(batch, "image:flair")
    expected = (encoder.sequence.weight[0] - encoder.sequence.weight[1]).detach()
    assert torch.allclose(diff, expected.expand(3, -1), atol=1e-6) and float(expected.abs().sum()) > 0
    mixed = {**RAW, "images": [{"name": "t1", "size": [16, 16]}, {"name": "flair", "size": [32, 32]}]}
    with pytest.raises(ConfigError, match='image-encoders = "shared" needs every image sequence in the same shape'):
        create_model(Schema.from_dict(mixed), ModelConfig(image_encoders="shared"))
    create_model(Schema.from_dict(mixed), ModelConfig(image_encoders="separate"))  # separate has no such need


def test_image_encoders_comes_from_the_run_config() -> None:
    assert FederationConfig.from_run_config({"image-encoders": "shared"}).model.image_encoders == "shared"
    assert FederationConfig.from_run_config({}).model.image_encoders == "separate"
    with pytest.raises(ConfigError, match="image-encoders must be one of \\('separate', 'shared'\\), got 'joint'"):
        ModelConfig(image_encoders="joint")


def _state(model: torch.nn.Module, value: float) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, dtype=np.float32) if v.is_floating_point() else v.numpy().copy()
            for k, v in model.state_dict().items()}


def _groups(model) -> dict[str, str]:
    return {name: group for group, names in model.parameter_groups().items() for name in names}


def test_separate_sequence_encoder_ignores_a_site_without_that_sequence(schema: Schema) -> None:
    """Site B has no FLAIR: the FLAIR encoder is site A's alone; T1 is averaged by T1 counts."""
    model = create_model(schema, ModelConfig(image_encoders="separate", embed_dim=8))
    current = _state(model, 0.0)
    a, b = _state(model, 1.0), _state(model, 5.0)
    counts = [{"num-examples": 10, "num-examples-image:t1": 10, "num-examples-image:flair": 10,
               "num-examples-clinical": 10},
              {"num-examples": 30, "num-examples-image:t1": 30, "num-examples-image:flair": 0,
               "num-examples-clinical": 30}]
    out = modality_weighted_average([a, b], counts, current, _groups(model))
    flair = [k for k in out if k.startswith("encoders.image:flair.")]
    t1 = [k for k in out if k.startswith("encoders.image:t1.")]
    assert flair and t1
    assert all(np.allclose(out[k], 1.0, atol=1e-6) for k in flair)  # B's 5.0 never reaches FLAIR
    assert all(np.allclose(out[k], (10 * 1.0 + 30 * 5.0) / 40, atol=1e-6) for k in t1)
    assert np.allclose(out["absent.image:flair.weight"], 4.0, atol=1e-6)  # fusion group: every site


def test_shared_image_encoder_is_weighted_by_the_sites_sequence_images(schema: Schema) -> None:
    model = create_model(schema, ModelConfig(image_encoders="shared", embed_dim=8))
    a, b = _state(model, 1.0), _state(model, 5.0)
    counts = [{"num-examples": 10, "num-examples-image:t1": 10, "num-examples-image:flair": 10},
              {"num-examples": 30, "num-examples-image:t1": 30, "num-examples-image:flair": 0}]
    assert modality_count(counts[0], "image") == 20.0 and modality_count(counts[1], "image:flair") == 0.0
    assert is_modality_count_key("num-examples-image:t1") and not is_modality_count_key("num-examples-fusion")
    out = modality_weighted_average([a, b], counts, _state(model, 0.0), _groups(model))
    assert np.allclose(out["encoders.image.backbone.features.0.weight"], (20 * 1.0 + 30 * 5.0) / 50, atol=1e-6)


@pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime
def test_strategy_aggregates_sequence_groups_from_real_replies(schema: Schema) -> None:
    """Through ModalityAwareFedAvg.aggregate_train, with uniform weights off and on."""
    model = create_model(schema, ModelConfig(image_encoders="separate", embed_dim=8))
    strategy = build_strategy("fedavg", _groups(model), min_sites=2)
    strategy._global = _state(model, 0.0)

    def reply(update: dict[str, np.ndarray], counts: dict[str, float], site: str) -> Message:
        request = Message(RecordDict({ARRAYS_KEY: numpy_to_arrays(update)}), dst_node_id=hash(site) % 1000 + 1,
                          message_type="train")
        return Message(RecordDict({ARRAYS_KEY: numpy_to_arrays(update), METRICS_KEY: MetricRecord(counts),
                                   SITE_KEY: ConfigRecord({"site-id": site})}), reply_to=request)

    replies = [reply(_state(model, 1.0), {"num-examples": 10, "num-examples-image:t1": 10,
                                          "num-examples-image:flair": 10, "num-examples-clinical": 10}, "A"),
               reply(_state(model, 5.0), {"num-examples": 30, "num-examples-image:t1": 30,
                                          "num-examples-image:flair": 0, "num-examples-clinical": 30}, "B")]
    arrays, _ = strategy.aggregate_train(1, replies)
    out = arrays_to_numpy(arrays)
    assert np.allclose(out["encoders.image:flair.proj.weight"], 1.0, atol=1e-6)
    assert np.allclose(out["encoders.image:t1.proj.weight"], 4.0, atol=1e-6)
    strategy.uniform_weights = True  # every site weighs 1 in every group, sequence groups included
    arrays, _ = strategy.aggregate_train(2, replies)
    assert np.allclose(arrays_to_numpy(arrays)["encoders.image:flair.proj.weight"], 3.0, atol=1e-6)


def test_single_image_schema_keeps_its_old_names() -> None:
    schema = Schema(name="x", task="classification", classes=("a", "b"), image=ImageSpec(size=(16, 16)))
    model = create_model(schema, ModelConfig(image_encoders="shared"))  # ignored for one image
    assert list(model.encoders) == ["image"] and model.parameter_groups()["image"]
    assert "encoders.image.backbone.features.0.weight" in model.state_dict()
