"""FusionModel / create_model: schemas, missing-modality machinery, parameter groups, persistence."""

from __future__ import annotations

import pytest
import torch

from fedfusion.common.config import ClinicalColumn, ConfigError, ModelConfig, Schema
from fedfusion.common.models import (
    PARAMETER_GROUPS,
    create_model,
    drop_modalities,
    list_fusions,
    parameter_group,
)


def _loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v.float().pow(2).mean() for k, v in out.items() if k != "modality_weights")


@pytest.mark.parametrize("fusion", list_fusions())
def test_clinical_only_classification_schema_builds_and_runs(make_batch, fusion):
    schema = Schema(name="clin", task="classification", classes=("0", "1", "2"),
                    clinical=(ClinicalColumn("age"), ClinicalColumn("sex", "categorical", ("f", "m"))))
    model = create_model(schema, ModelConfig(fusion=fusion))

    out = model(make_batch(schema, batch_size=3))
    _loss(out).backward()

    assert set(model.encoders) == {"clinical"}
    assert out["logits"].shape == (3, 3)
    assert "risk" not in out


@pytest.mark.parametrize("fusion", list_fusions())
def test_omics_and_clinical_survival_schema_builds_and_runs(make_batch, fusion):
    schema = Schema(name="ovarian", task="survival", omics=tuple(f"g{i}" for i in range(7)),
                    clinical=(ClinicalColumn("residual", "categorical", ("a", "b")),))
    model = create_model(schema, ModelConfig(fusion=fusion))

    batch = make_batch(schema, batch_size=4)
    del batch["clinical_num"]  # categorical-only clinical: the numeric tensor may be absent
    out = model(batch)
    _loss(out).backward()

    assert out["risk"].shape == (4,)
    assert "logits" not in out


def test_numeric_only_clinical_accepts_an_empty_categorical_tensor(make_batch):
    schema = Schema(name="num", task="classification", classes=("a", "b"),
                    clinical=(ClinicalColumn("x"), ClinicalColumn("y")))
    batch = make_batch(schema, batch_size=2)
    assert batch["clinical_cat"].shape == (2, 0)
    for fusion in ("concat", "early"):
        assert create_model(schema, ModelConfig(fusion=fusion))(batch)["logits"].shape == (2, 2)


@pytest.mark.parametrize("fusion", list_fusions())
def test_state_dict_round_trip_gives_identical_outputs(schema, make_batch, tmp_path, fusion):
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion=fusion)).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)
    fresh = create_model(schema, ModelConfig(fusion=fusion)).eval()

    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))

    batch = make_batch(schema, batch_size=4, seed=5)
    for key, value in model(batch).items():
        torch.testing.assert_close(fresh(batch)[key], value, rtol=0, atol=0)


def test_state_dict_holds_only_parameters(schema):
    """No buffers (BatchNorm stats): FedAvg over named parameters covers the whole state."""
    model = create_model(schema, ModelConfig())
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


def test_drop_modalities_never_empties_a_row_and_never_adds_one():
    torch.manual_seed(0)
    mask = torch.rand(2000, 3) < 0.6
    mask[:, 1] |= ~mask.any(dim=1)

    dropped = drop_modalities(mask, 0.9)

    assert dropped.any(dim=1).all()
    assert not (dropped & ~mask).any()
    single = mask.sum(dim=1) == 1
    assert torch.equal(dropped[single], mask[single])
    assert 0.4 < (mask & ~dropped).sum() / mask.sum() < 0.9


def test_drop_modalities_is_reproducible_from_the_torch_seed():
    mask = torch.ones(50, 3, dtype=torch.bool)
    torch.manual_seed(7)
    first = drop_modalities(mask, 0.5)
    torch.manual_seed(7)
    assert torch.equal(drop_modalities(mask, 0.5), first)
    assert torch.equal(drop_modalities(mask, 0.0), mask)


def test_modality_dropout_acts_in_training_only(schema, make_batch):
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion="attention", modality_dropout=0.9, dropout=0.0))
    batch = make_batch(schema, batch_size=64, present=(True, True, True))

    model.train()
    train_weights = model(batch)["modality_weights"]
    model.eval()
    eval_weights = model(batch)["modality_weights"]

    assert (train_weights > 0).any(dim=1).all()
    assert (train_weights == 0).any()
    assert (eval_weights > 0).all()
    torch.testing.assert_close(model(batch)["modality_weights"], eval_weights)


def test_parameter_groups_cover_every_parameter_by_name_prefix(schema):
    model = create_model(schema, ModelConfig(fusion="attention"))

    groups = model.parameter_groups()

    assert tuple(groups) == PARAMETER_GROUPS
    names = [n for names in groups.values() for n in names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    for modality in ("image", "clinical", "omics"):
        assert groups[modality]
        assert all(n.startswith(f"encoders.{modality}.") for n in groups[modality])
        # absent embeddings are trained by the sites that LACK the modality: shared, not the modality's
        assert f"absent.{modality}.weight" in groups["fusion"]
    assert all(n.startswith(("fusion.", "absent.")) for n in groups["fusion"]) and groups["fusion"]
    assert all(n.startswith("heads.") for n in groups["head"]) and groups["head"]


def test_late_fusion_heads_belong_to_their_modality(schema):
    groups = create_model(schema, ModelConfig(fusion="late")).parameter_groups()
    assert "heads.classification.per_modality.omics.linear.weight" in groups["omics"]
    assert groups["head"] == [] and groups["fusion"] == []


def test_parameter_group_understands_wrapped_names():
    assert parameter_group("_module.encoders.image.backbone.features.0.weight") == "image"
    assert parameter_group("module.heads.survival.linear.weight") == "head"
    with pytest.raises(ValueError, match="not a FusionModel parameter"):
        parameter_group("encoder.image.weight")


def test_unknown_names_are_config_errors(schema):
    with pytest.raises(ConfigError, match="unknown fusion 'sum'.*attention"):
        create_model(schema, ModelConfig(fusion="sum"))
    with pytest.raises(ConfigError, match="unknown image-backbone 'resnet19'"):
        create_model(schema, ModelConfig(image_backbone="resnet19"))


def test_pretrained_path_without_image_modality_is_an_error(tmp_path):
    schema = Schema(name="clin", task="survival", clinical=(ClinicalColumn("age"),))
    with pytest.raises(ConfigError, match="no image modality"):
        create_model(schema, ModelConfig(pretrained_path=str(tmp_path / "w.pt")))


def test_bad_batches_raise_actionable_errors(schema, make_batch):
    model = create_model(schema, ModelConfig())
    batch = make_batch(schema, batch_size=2)
    with pytest.raises(ValueError, match=r"batch\['omics'\] has shape \(2, 9\).*\(B, 10\)"):
        model(dict(batch, omics=batch["omics"][:, :9]))
    with pytest.raises(ValueError, match=r"batch\['mask'\]"):
        model(dict(batch, mask=batch["mask"][:, :2]))
    with pytest.raises(ValueError, match="no modality present"):
        model(dict(batch, mask=torch.zeros(2, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"batch\['image'\]"):
        model(dict(batch, image=batch["image"][:, :, :16]))


@pytest.mark.parametrize("fusion", list_fusions())
def test_empty_batch_runs(schema, make_batch, fusion):
    """Opacus' Poisson sampling can yield empty batches."""
    batch = {k: v[:0] for k, v in make_batch(schema, batch_size=2).items()}
    out = create_model(schema, ModelConfig(fusion=fusion))(batch)
    assert out["logits"].shape == (0, 2) and out["risk"].shape == (0,)
