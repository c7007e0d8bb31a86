"""Long-format (longitudinal) manifests: collapsing to cases, case-level consistency, max-visits, no-visit
cases, visit tensors, preprocessing on train rows only, the schema's "visits" section and create_model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfusion.common.config import ClinicalColumn, ConfigError, ModelConfig, Schema, VisitSpec, load_schema
from fedfusion.common.data import MultimodalDataset, Preprocessor
from fedfusion.common.longitudinal import VISIT_TIMES, VISIT_VALUES
from fedfusion.common.manifest import ManifestError, load_manifest
from fedfusion.common.models import create_model, list_fusions, parameter_group
from fedfusion.common.training import LossFunction
from tests.opacus_step import one_private_step

HEADER = "case_id,split,time,event,age,sex,visit_time,grad,ef"
# p1: three visits written out of time order; p2: one; p3: no visit; p4: two, one value missing; p5/p6 test
ROWS = [
    "p1,train,4.0,1,70,male,1.0,12,60",
    "p1,train,4.0,1,70,male,0.0,10,65",
    "p1,train,4.0,1,70,male,0.5,11,",
    "p2,train,6.0,0,55,female,0.0,20,70",
    "p3,train,3.0,1,80,male,,,",
    "p4,train,5.0,0,62,female,0.0,14,80",
    "p4,train,5.0,0,62,female,2.0,,75",
    "p5,test,2.0,1,75,male,0.0,100,10",
    "p6,val,7.0,0,50,female,0.0,30,90",
]


def _schema(max_visits: int = 8) -> Schema:
    return Schema(name="long", task="survival",
                  clinical=(ClinicalColumn("age"), ClinicalColumn("sex", "categorical", ("male", "female"))),
                  visits=VisitSpec(time_column="visit_time", columns=("grad", "ef"), max_visits=max_visits))


def _write(tmp_path: Path, rows: list[str] = ROWS, header: str = HEADER) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _issues(path: Path, schema: Schema) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, schema)
    return [str(i) for i in caught.value.issues]


def test_long_manifest_collapses_to_one_row_per_case_with_sorted_visits(tmp_path):
    manifest = load_manifest(_write(tmp_path), _schema())

    frame = manifest.frame
    assert frame["case_id"].tolist() == ["p1", "p2", "p3", "p4", "p5", "p6"]
    assert frame["split"].tolist() == ["train"] * 4 + ["test", "val"]
    assert frame["time"].tolist() == [4.0, 6.0, 3.0, 5.0, 2.0, 7.0]
    assert frame["age"].tolist() == [70, 55, 80, 62, 75, 50]
    np.testing.assert_array_equal(frame[VISIT_TIMES][0], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(frame[VISIT_VALUES][0], [[10, 65], [11, np.nan], [12, 60]])
    assert len(frame[VISIT_TIMES][2]) == 0 and frame[VISIT_VALUES][2].shape == (0, 2)
    np.testing.assert_array_equal(frame[VISIT_VALUES][3], [[14, 80], [np.nan, 75]])
    present = manifest.modality_present()
    assert present["visits"].tolist() == [True, True, False, True, True, True]
    assert present["clinical"].all()
    assert manifest.summary()["splits"] == {"train": 4, "val": 1, "test": 1}


def test_case_level_value_that_differs_between_visits_names_file_lines_case_and_column(tmp_path):
    rows = list(ROWS)
    rows[2] = "p1,train,4.0,1,71,male,0.5,11,"  # line 4: age 71 where line 2 says 70
    rows[6] = "p4,test,5.0,0,62,female,2.0,,75"  # line 8: split differs
    path = _write(tmp_path, rows)

    issues = _issues(path, _schema())

    assert len(issues) == 2
    age = next(i for i in issues if "'age'" in i)
    assert age.startswith(f"{path}, line 4, case 'p1', column 'age'")
    assert "line 2 has '70', line 4 has '71'" in age and "same value on every visit row" in age
    split = next(i for i in issues if "'split'" in i)
    assert "line 8, case 'p4', column 'split'" in split and "line 7 has 'train', line 8 has 'test'" in split


def test_a_case_level_error_names_the_cases_first_line(tmp_path):
    rows = list(ROWS)
    rows[3] = "p2,train,-6.0,0,55,female,0.0,20,70"  # p2's only row is line 5
    assert any(i.startswith(f"{tmp_path / 'manifest.csv'}, line 5, case 'p2', column 'time'")
               for i in _issues(_write(tmp_path, rows), _schema()))


def test_bad_visit_rows_are_reported_with_line_and_column(tmp_path):
    rows = list(ROWS)
    rows[1] = "p1,train,4.0,1,70,male,0.0,ten,65"  # line 3: not a number
    rows[5] = "p4,train,5.0,0,62,female,,14,80"  # line 7: values but no visit time
    rows[6] = "p4,train,5.0,0,62,female,2.0,,75"
    rows.append("p2,train,6.0,0,55,female,0.0,21,71")  # line 11: p2 twice at time 0 (line 5)
    issues = _issues(_write(tmp_path, rows), _schema())

    assert any("line 3, case 'p1', column 'grad'" in i and "'ten' is not a finite number" in i for i in issues)
    assert any("line 7, case 'p4', column 'visit_time'" in i and "per-visit values but no" in i for i in issues)
    assert any("line 11, case 'p2', column 'visit_time'" in i and "lines 5 and 11" in i for i in issues)
    assert len(issues) == 3


def test_missing_visit_columns_is_one_clear_error(tmp_path):
    header = "case_id,split,time,event,age,sex,visit_time,grad"
    rows = [r.rsplit(",", 1)[0] for r in ROWS]
    (issue,) = _issues(_write(tmp_path, rows, header), _schema())
    assert "missing visit column(s) ['ef']" in issue and "long format" in issue


def test_visits_beyond_max_keep_the_last_ones_and_warn(tmp_path):
    manifest = load_manifest(_write(tmp_path), _schema(max_visits=2))

    np.testing.assert_array_equal(manifest.frame[VISIT_TIMES][0], [0.5, 1.0])  # p1's oldest visit dropped
    np.testing.assert_array_equal(manifest.frame[VISIT_VALUES][0], [[11, np.nan], [12, 60]])
    np.testing.assert_array_equal(manifest.frame[VISIT_TIMES][3], [0.0, 2.0])
    assert any("1 visit(s)" in w and "max_visits 2" in w for w in manifest.warnings)


def test_visit_tensors_padding_gaps_standardisation_and_train_only_statistics(tmp_path):
    manifest = load_manifest(_write(tmp_path), _schema(max_visits=4))
    pre = Preprocessor.fit(manifest)  # train rows: p1..p4 only; p5's grad 100 must not enter
    train_grad = [10, 11, 12, 20, 14]
    train_ef = [65, 60, 70, 80, 75]
    np.testing.assert_allclose(pre.visits_mean, [np.mean(train_grad), np.mean(train_ef)], atol=1e-9)
    np.testing.assert_allclose(pre.visits_std, [np.std(train_grad), np.std(train_ef)], atol=1e-9)
    scale = np.std([0.0, 0.5, 1.0, 0.0, 0.0, 2.0])
    np.testing.assert_allclose(pre.visits_time_scale, [scale], atol=1e-9)

    data = MultimodalDataset(manifest, pre, "train")
    p1, p3 = data[0], data[2]
    assert p1["visits"].shape == (4, 4) and p1["visits_mask"].tolist() == [True, True, True, False]
    np.testing.assert_allclose(p1["visits_gap"].numpy(), np.array([0, 0.5, 0.5, 0]) / scale, rtol=1e-6)
    np.testing.assert_allclose(p1["visits_time"].numpy(), np.array([0, 0.5, 1.0, 0]) / scale, rtol=1e-6)
    z = (10 - np.mean(train_grad)) / np.std(train_grad)
    assert p1["visits"][0, 0].item() == pytest.approx(z, rel=1e-6) and p1["visits"][0, 1].item() == 0.0
    assert p1["visits"][1, 2].item() == 0.0 and p1["visits"][1, 3].item() == 1.0  # ef missing at visit 2
    assert not p3["visits_mask"].any() and p3["visits"].abs().sum() == 0
    assert p3["mask"].tolist() == [True, False]  # clinical present, visits absent
    restored = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    np.testing.assert_allclose(restored.visits_mean, pre.visits_mean)


def test_schema_visits_section_round_trips_and_rejects_bad_settings(tmp_path):
    schema = _schema(max_visits=5)
    assert schema.modalities == ("clinical", "visits")
    loaded = load_schema(schema.save(tmp_path / "schema.json"))
    assert loaded == schema
    assert json.loads((tmp_path / "schema.json").read_text())["visits"] == {
        "time_column": "visit_time", "columns": ["grad", "ef"], "max_visits": 5}
    only_visits = Schema(name="v", task="survival", visits=VisitSpec(columns=("grad",)))
    assert only_visits.modalities == ("visits",)
    assert schema.with_modalities(["visits"]).modalities == ("visits",)

    with pytest.raises(ConfigError, match="visits.columns must list at least one"):
        Schema(name="bad", task="survival", visits=VisitSpec(columns=()))
    with pytest.raises(ConfigError, match=r"columns \['age'\] are both clinical and per-visit"):
        Schema(name="bad", task="survival", clinical=(ClinicalColumn("age"),), visits=VisitSpec(columns=("age",)))
    with pytest.raises(ConfigError, match="max_visits must be >= 1"):
        Schema(name="bad", task="survival", visits=VisitSpec(columns=("grad",), max_visits=0))
    raw = schema.to_dict()
    raw["visits"]["every"] = 2
    with pytest.raises(ConfigError, match=r"x.json: unknown keys \['every'\] in 'visits'"):
        Schema.from_dict(raw, source="x.json")


@pytest.mark.parametrize("encoder", ["gru", "transformer"])
def test_create_model_with_visits_trains_and_uses_absent_for_cases_without_visits(tmp_path, encoder):
    manifest = load_manifest(_write(tmp_path), _schema(max_visits=4))
    data = MultimodalDataset(manifest, Preprocessor.fit(manifest), None)
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}
    torch.manual_seed(0)
    model = create_model(manifest.schema, ModelConfig(temporal_encoder=encoder, modality_dropout=0.0))

    assert type(model.encoders["visits"]).__name__ == {"gru": "VisitGRU", "transformer": "VisitTransformer"}[encoder]
    groups = model.parameter_groups()
    assert groups["visits"] and all(parameter_group(n) == "visits" for n in groups["visits"])
    assert "absent.visits.weight" in dict(model.named_parameters())
    out = model(batch)
    assert out["risk"].shape == (6,) and torch.isfinite(out["risk"]).all()
    out["risk"].sum().backward()
    assert all(p.grad is not None for p in model.encoders["visits"].parameters())

    model.eval()
    p3 = 2  # no visits: whatever sits in its padding, the model sees the learned absent embedding
    garbage = {**batch, "visits": batch["visits"].clone()}
    garbage["visits"][p3] = 5.0
    assert torch.allclose(model(batch)["risk"][p3], model(garbage)["risk"][p3])
    changed = {**batch, "visits": batch["visits"].clone()}
    changed["visits"][0, 0, 0] += 3.0  # p1 has visits: its risk must react
    assert not torch.allclose(model(batch)["risk"][0], model(changed)["risk"][0])


def test_model_config_rejects_an_unknown_temporal_encoder():
    with pytest.raises(ConfigError, match="temporal-encoder must be one of"):
        ModelConfig(temporal_encoder="lstm")


def _model_batch(tmp_path: Path) -> tuple[Schema, dict[str, torch.Tensor]]:
    manifest = load_manifest(_write(tmp_path), _schema(max_visits=4))
    data = MultimodalDataset(manifest, Preprocessor.fit(manifest), None)
    return manifest.schema, {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}


@pytest.mark.parametrize("fusion", list_fusions())
def test_every_fusion_trains_with_visits(tmp_path, fusion):
    schema, batch = _model_batch(tmp_path)
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion=fusion))
    out = model(batch)
    out["risk"].sum().backward()
    assert torch.isfinite(out["risk"]).all()
    assert all(p.grad is not None for p in model.encoders["visits"].parameters())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
@pytest.mark.parametrize("encoder", ["gru", "transformer"])
def test_one_real_dp_sgd_step_of_the_whole_model_with_visits(tmp_path, encoder):
    schema, batch = _model_batch(tmp_path)
    samples = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["mask"]))]
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(temporal_encoder=encoder))
    step = one_private_step(model, samples, LossFunction(schema))
    assert step.missing == []
    assert step.unchanged == []
