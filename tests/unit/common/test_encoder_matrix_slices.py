"""Encoders that run one module several times per step (2-D slice pooling over D slices, one shared
encoder over S sequences): their names, pooling, and that Opacus' per-sample gradients are still
per CASE (equal to the gradient of that case alone), which is what DP-SGD's clipping relies on."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule

from fedfusion.common.config import ConfigError, ImageSpec, ModelConfig, Schema
from fedfusion.common.models import create_model
from fedfusion.common.models.encoders import SlicePooling, SmallCNN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
              pytest.mark.filterwarnings("ignore:Using a non-full backward hook:UserWarning")]

VOLUME = ImageSpec(size=(16, 16), depth=3)
NO_DROPOUT = {"embed_dim": 8, "dropout": 0.0, "modality_dropout": 0.0}


def _schema(**images) -> Schema:
    return Schema(name="vol", task="both", classes=("a", "b"), omics=("g1", "g2"), **images)


def test_attention_pooling_starts_as_the_mean_then_weighs_slices_by_content() -> None:
    torch.manual_seed(0)
    inner = SmallCNN(1)
    attention, mean = SlicePooling(inner, "attention"), SlicePooling(inner, "mean")
    attention.build_score(inner.num_features)
    x = torch.randn(2, 1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(attention(x), mean(x), atol=1e-6)  # zero-initialised scorer: uniform weights
        assert torch.allclose(mean(x), mean(x.flip(2)), atol=1e-6)
        per_slice = torch.stack([inner(x[:, :, d]) for d in range(3)], dim=1).mean(dim=1)
        assert torch.allclose(mean(x), per_slice, atol=1e-6)
        attention.score.weight.normal_()
        assert not torch.allclose(attention(x), mean(x), atol=1e-4)  # a trained scorer weighs slices unevenly
        features = torch.stack([inner(x[:, :, d]) for d in range(3)], dim=1)
        weights = torch.softmax(attention.score(features).squeeze(-1), dim=1)
        assert torch.allclose(attention(x), (weights.unsqueeze(-1) * features).sum(dim=1), atol=1e-6)


@pytest.mark.parametrize(("name", "pooling"), [("cnn_small_slices", "attention"), ("cnn_small_slices_mean", "mean"),
                                               ("slices:cnn_small", "attention"), ("slices_mean:resnet18", "mean")])
def test_slice_pooling_is_selected_by_backbone_name(name: str, pooling: str) -> None:
    model = create_model(_schema(image=VOLUME), ModelConfig(image_backbone=name, embed_dim=8))
    backbone = model.encoders["image"].backbone
    assert isinstance(backbone, SlicePooling) and backbone.pooling == pooling
    assert (backbone.score is not None) == (pooling == "attention")


@pytest.mark.parametrize(("name", "expected"), [
    ("slices:cnn3d_small", "slice pooling needs a 2-D backbone, 'cnn3d_small' is volumetric"),
    ("slices:slices:cnn_small", "slice pooling over slice pooling"),
])
def test_bad_slice_pooling_names_are_clear_errors(name: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        create_model(_schema(image=VOLUME), ModelConfig(image_backbone=name))


def test_a_2d_checkpoint_loads_into_the_slice_backbone(tmp_path) -> None:
    torch.manual_seed(1)
    source = SmallCNN(1)
    torch.save(source.state_dict(), tmp_path / "cnn_small.pt")
    model = create_model(_schema(image=VOLUME), ModelConfig(image_backbone="cnn_small_slices",
                                                            pretrained_path=str(tmp_path / "cnn_small.pt")))
    loaded = model.encoders["image"].backbone.slice.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def _batch(schema: Schema, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    batch = {m: torch.randn(n, *spec.shape, generator=g) for m, spec in schema.image_specs.items()}
    batch["omics"] = torch.randn(n, 2, generator=g)
    batch["mask"] = torch.ones(n, len(schema.modalities), dtype=torch.bool)
    return batch


@pytest.mark.parametrize("kind", ["cnn_small_slices", "slices_mean:cnn_small", "shared-sequences"])
def test_opacus_per_sample_gradients_are_per_case(kind: str) -> None:
    if kind == "shared-sequences":
        seqs = (ImageSpec(column="a", size=(16, 16), name="t1"), ImageSpec(column="b", size=(16, 16), name="flair"))
        schema, cfg = _schema(images=seqs), ModelConfig(image_encoders="shared", **NO_DROPOUT)
    else:
        schema, cfg = _schema(image=VOLUME), ModelConfig(image_backbone=kind, **NO_DROPOUT)
    torch.manual_seed(0)
    model = create_model(schema, cfg).train()  # Opacus hooks record only in train mode; dropouts are 0
    if kind == "cnn_small_slices":
        model.encoders["image"].backbone.score.weight.data.normal_()  # non-uniform slice weights
    batch = _batch(schema, 3)

    def loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
        return out["logits"].logsumexp(dim=1).sum() + out["risk"].pow(2).sum()  # a sum of per-case terms

    private = GradSampleModule(model, loss_reduction="sum")
    loss(private(batch)).backward()
    names = [n for n, p in model.named_parameters() if n.startswith("encoders.image")]
    samples = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if n in names}
    private._close()
    for i in range(3):
        model.zero_grad()
        loss(model({k: v[i : i + 1] for k, v in batch.items()})).backward()
        for n, p in model.named_parameters():
            if n in names:
                assert samples[n].shape[0] == 3
                assert torch.allclose(samples[n][i], p.grad, atol=1e-5, rtol=1e-4), (n, i)
