"""Transfer learning without downloads: checkpoint layouts, partial loads, freezing, per-group lr.

Checkpoints are saved from randomly initialised timm models of the same architecture, so nothing
is downloaded and the expected weights are exactly the file's.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from fedfusion.common.config import ConfigError, ImageSpec, ModelConfig, TrainConfig
from fedfusion.common.models import create_model
from fedfusion.common.models.encoders import build_image_encoder, build_timm_backbone
from fedfusion.common.models.transfer import backbone_blocks
from fedfusion.common.training import LossFunction, make_optimizer, train_epochs

GREY32 = ImageSpec(size=(32, 32), channels=1)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> tuple[dict[str, torch.Tensor], object]:
    """A stock (pre-surgery, BatchNorm, 1000-class) resnet18 state_dict and the folder to save it in."""
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False, in_chans=1)
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return source.state_dict(), tmp_path_factory.mktemp("weights")


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "module.", "backbone.", "encoder."])
def test_every_common_checkpoint_layout_loads_the_files_weights(resnet_file, layout):
    state, folder = resnet_file
    if layout in ("state_dict", "model"):
        saved: object = {layout: state, "epoch": 7}
    elif layout.endswith("."):
        saved = {f"{layout}{k}": v for k, v in state.items()}
    else:
        saved = state
    path = folder / f"{layout}.pth"
    torch.save(saved, path)

    backbone = build_timm_backbone("resnet18", GREY32, pretrained_path=str(path))

    loaded = backbone.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"])
    torch.testing.assert_close(loaded["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    # BatchNorm became GroupNorm (surgery): its affine weights are carried over, its statistics dropped.
    torch.testing.assert_close(loaded["layer1.0.bn1.weight"], state["layer1.0.bn1.weight"])
    assert isinstance(backbone.layer1[0].bn1, torch.nn.GroupNorm)
    assert not any("running_mean" in k for k in loaded)


def test_partial_file_is_refused_by_default_and_accepted_above_the_fraction(resnet_file):
    state, folder = resnet_file
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    path = folder / "partial.pth"
    torch.save(partial, path)

    with pytest.raises(ValueError) as strict:
        build_timm_backbone("resnet18", GREY32, pretrained_path=str(path))
    assert str(path) in str(strict.value) and "layer4.0.conv1.weight" in str(strict.value)

    with pytest.warns(UserWarning, match=r"loaded \d+ of \d+ tensors.*layer4\.0\.conv1\.weight"):
        backbone = build_timm_backbone("resnet18", GREY32, pretrained_path=str(path), min_fraction=0.5)
    torch.testing.assert_close(backbone.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])

    with pytest.raises(ValueError, match=r"only \d+ of \d+ backbone tensors would load \(pretrained-min-fraction"):
        build_timm_backbone("resnet18", GREY32, pretrained_path=str(path), min_fraction=0.99)


def test_mismatched_or_corrupt_file_through_create_model_names_the_file(schema, tmp_path):
    wrong = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto", pretrained=False).state_dict(), wrong)
    with pytest.raises(ValueError, match=rf"{wrong}.*does not fit image backbone 'resnet18'.*0 of"):
        create_model(schema, ModelConfig(image_backbone="resnet18", pretrained_path=str(wrong)))

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match=rf"{corrupt}: not a weights file"):
        create_model(schema, ModelConfig(image_backbone="cnn_small", pretrained_path=str(corrupt)))


def test_a_saved_fedfusion_resnet_reloads_after_surgery(schema, tmp_path):
    """Its GroupNorm keys also fit the stock model's BatchNorm names (minus the running statistics):
    the complete post-surgery fit must win over the partial pre-surgery one."""
    torch.manual_seed(0)
    earlier = create_model(schema, ModelConfig(image_backbone="resnet18"))
    torch.save(earlier.state_dict(), tmp_path / "run.pt")
    model = create_model(schema, ModelConfig(image_backbone="resnet18", pretrained_path=str(tmp_path / "run.pt")))
    for key, value in earlier.encoders["image"].backbone.state_dict().items():
        torch.testing.assert_close(model.encoders["image"].backbone.state_dict()[key], value)


def test_classifier_keys_of_a_small_cnn_file_are_dropped(tmp_path):
    source = build_image_encoder("cnn_small", GREY32, embed_dim=8).backbone
    state = {**source.state_dict(), "fc.weight": torch.zeros(2, 128), "fc.bias": torch.zeros(2)}
    torch.save(state, tmp_path / "cnn.pt")
    encoder = build_image_encoder("cnn_small", GREY32, embed_dim=8, pretrained_path=str(tmp_path / "cnn.pt"))
    torch.testing.assert_close(encoder.backbone.features[0].weight, source.features[0].weight)


def _train_one_step(schema, model) -> dict[str, torch.Tensor]:
    from tests.unit.common.models.conftest import random_batch

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = random_batch(schema, batch_size=4, present=(True, True, True))
    batch.update(label=torch.tensor([0, 1, 0, 1]), time=torch.arange(1.0, 5.0), event=torch.ones(4))
    cfg = TrainConfig(lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=0.1)
    train_epochs(model, [batch], make_optimizer(model, cfg), LossFunction(schema), 1, torch.device("cpu"))
    return before


def test_frozen_backbone_does_not_change_but_the_rest_trains(schema):
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(image_backbone="cnn_small", freeze_backbone=True))
    before = _train_one_step(schema, model)

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    backbone = {n for n, _ in model.named_parameters() if n.startswith("encoders.image.backbone.")}
    assert backbone and not changed & backbone
    assert "encoders.image.proj.weight" in changed and any(n.startswith("heads.") for n in changed)


def test_trainable_blocks_trains_only_the_last_stages(schema):
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(image_backbone="cnn_small", trainable_blocks=2))
    assert backbone_blocks(model.encoders["image"].backbone) == ["features.0", "features.3", "features.6",
                                                                 "features.9"]
    before = _train_one_step(schema, model)

    prefix = "encoders.image.backbone.features."
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert not {n for n in changed if n.startswith((prefix + "0.", prefix + "1.", prefix + "3.", prefix + "4."))}
    assert {prefix + "6.weight", prefix + "9.weight"} <= changed


def test_trainable_blocks_of_timm_backbones_follow_their_stages():
    backbone = build_timm_backbone("resnet18", GREY32)
    assert backbone_blocks(backbone) == ["layer1", "layer2", "layer3", "layer4"]
    from fedfusion.common.models.transfer import freeze_image_backbone

    freeze_image_backbone(backbone, freeze=True, trainable_blocks=1, name="resnet18")
    trainable = {n.split(".")[0] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
    with pytest.raises(ConfigError, match="trainable-blocks = 5 but image backbone 'resnet18' has 4 blocks"):
        freeze_image_backbone(backbone, freeze=False, trainable_blocks=5, name="resnet18")


def test_sites_build_the_architecture_without_reading_the_weights_file(schema, tmp_path):
    """Only the coordinator reads pretrained-path: sites get its weights as the round's global model."""
    from fedfusion.client.runtime import SiteRuntime

    cfg = ModelConfig(image_backbone="cnn_small", pretrained_path=str(tmp_path / "only-at-the-server.pt"),
                      freeze_backbone=True)
    site = SiteRuntime.__new__(SiteRuntime)
    site.schema = schema
    model = site.build_model(cfg)
    assert not any(p.requires_grad for p in model.encoders["image"].backbone.parameters())
    with pytest.raises(ValueError, match="file not found"):
        create_model(schema, cfg)
    assert dataclasses.replace(cfg, pretrained_path=None).freeze_backbone
