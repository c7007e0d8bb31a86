"""Image backbones: Opacus surgery of every registered backbone, local weights, the timm: path."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from fedfusion.common import models as models_pkg
from fedfusion.common.config import ImageSpec, ModelConfig
from fedfusion.common.models import create_model, list_image_backbones
from fedfusion.common.models.encoders import (
    build_image_encoder,
    build_timm_backbone,
    load_local_weights,
    make_opacus_ready,
    num_groups,
)
from fedfusion.common.models.encoders.surgery import NormAct

GREY32 = ImageSpec(size=(32, 32), channels=1)


@pytest.mark.parametrize("name", list_image_backbones())
def test_registered_backbones_are_opacus_ready_after_surgery(name):
    encoder = build_image_encoder(name, GREY32, embed_dim=16)

    modules = list(encoder.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert not any(getattr(m, "inplace", False) is True for m in modules)
    assert not any(getattr(m, "grad_checkpointing", False) is True for m in modules)
    assert not list(encoder.buffers())
    out = encoder({"image": torch.randn(2, 1, 32, 32)})
    assert out.shape == (2, 16) and torch.isfinite(out).all()


def test_rgb_images_and_other_sizes_work():
    encoder = build_image_encoder("vit_tiny_patch16_224", ImageSpec(size=(48, 64), channels=3), embed_dim=8)
    assert encoder({"image": torch.randn(2, 3, 48, 64)}).shape == (2, 8)


def test_batchnorm_becomes_groupnorm_keeping_affine_and_activation():
    bn = BatchNormAct2d(24, act_layer=nn.ReLU, inplace=True)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    model = nn.Sequential(nn.Conv2d(1, 24, 3), bn, nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16))

    make_opacus_ready(model)

    assert isinstance(model[1], NormAct) and type(model[1].norm) is nn.GroupNorm
    assert model[1].norm.num_groups == 12
    torch.testing.assert_close(model[1].norm.weight, bn.weight)
    torch.testing.assert_close(model[1].norm.bias, bn.bias)
    assert isinstance(model[1].act, nn.ReLU) and model[1].act.inplace is False
    assert type(model[3]) is nn.GroupNorm  # plain BN: no wrapper, same parameter names


@pytest.mark.parametrize(
    ("channels", "groups"), [(1, 1), (3, 1), (16, 8), (24, 12), (64, 32), (88, 22), (1280, 32)]
)
def test_num_groups_divides_channels(channels, groups):
    assert num_groups(channels) == groups


def test_any_timm_model_through_the_generic_path():
    encoder = build_image_encoder("timm:regnetx_002", GREY32, embed_dim=8)
    assert encoder({"image": torch.randn(2, 1, 32, 32)}).shape == (2, 8)


def test_generic_path_rejects_models_with_in_place_residuals():
    with pytest.raises(ValueError, match="timm:dla34 cannot train under Opacus.*in place"):
        build_image_encoder("timm:dla34", GREY32, embed_dim=8)


def test_generic_path_rejects_unknown_timm_names():
    with pytest.raises(ValueError, match="not a timm model name"):
        build_image_encoder("timm:resnet19", GREY32, embed_dim=8)


def test_pretrained_path_loads_imagenet_style_file_before_surgery(tmp_path):
    """A stock 3-channel, 1000-class timm file: classifier ignored, first conv adapted, BN affine kept."""
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():
        source.bn1.weight.uniform_(0.5, 2.0)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")

    backbone = build_timm_backbone("resnet18", GREY32, pretrained_path=str(tmp_path / "resnet18.pth"))

    torch.testing.assert_close(backbone.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    torch.testing.assert_close(backbone.bn1.weight, source.bn1.weight)
    assert backbone.conv1.weight.shape[1] == 1


def test_pretrained_path_accepts_wrapped_and_prefixed_state_dicts(tmp_path):
    source = build_image_encoder("cnn_small", GREY32, embed_dim=8).backbone
    wrapped = {"epoch": 3, "state_dict": {f"module.backbone.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")

    encoder = build_image_encoder("cnn_small", GREY32, embed_dim=8, pretrained_path=str(tmp_path / "ckpt.pt"))

    for key, value in source.state_dict().items():
        torch.testing.assert_close(encoder.backbone.state_dict()[key], value)


def test_pretrained_path_accepts_a_whole_fedfusion_checkpoint(schema, tmp_path):
    """E.g. the image backbone of an earlier federated run; its norm layers were renamed by surgery."""
    cfg = ModelConfig(image_backbone="mobilenetv3_small_100")
    torch.manual_seed(0)
    earlier = create_model(schema, cfg)
    torch.save({"model": earlier.state_dict()}, tmp_path / "run.pt")

    torch.manual_seed(1)
    model = create_model(schema, replace(cfg, pretrained_path=str(tmp_path / "run.pt")))

    for key, value in earlier.encoders["image"].backbone.state_dict().items():
        torch.testing.assert_close(model.encoders["image"].backbone.state_dict()[key], value)


def test_pretrained_path_resamples_vit_position_embeddings(tmp_path):
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "vit.pth")
    backbone = build_timm_backbone("vit_tiny_patch16_224", GREY32, pretrained_path=str(tmp_path / "vit.pth"))
    assert backbone.pos_embed.shape == (1, 1 + 4, 192)


def test_wrong_weights_file_names_the_file_and_the_keys(tmp_path):
    path = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto", pretrained=False, num_classes=0).state_dict(), path)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)

    with pytest.raises(ValueError) as info:
        load_local_weights(model, path, "resnet18")

    message = str(info.value)
    assert str(path) in message and "resnet18" in message
    assert re.search(r"\d+ missing keys \[.*'conv1.weight'", message)
    assert re.search(r"\d+ unexpected keys \[.*'stem.0.weight'", message)


def test_missing_or_unreadable_weights_file_is_a_clear_error(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="file not found"):
        load_local_weights(model, tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_local_weights(model, tmp_path / "junk.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_local_weights(model, tmp_path / "list.pt")


def test_no_code_path_asks_a_hub_for_weights():
    root = Path(models_pkg.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py") if re.search(r"pretrained\s*=\s*True", p.read_text())]
    assert offenders == []
