"""Registries: names, duplicates, the reserved timm: prefix."""

from __future__ import annotations

import pytest

from fedfusion.common.models import (
    list_fusions,
    list_heads,
    list_image_backbones,
    register_fusion,
    register_image_backbone,
    registry,
)


def test_expected_names_are_registered():
    assert {"early", "concat", "attention", "gated", "kronecker", "late"} <= set(list_fusions())
    assert {"cnn_small", "resnet18", "densenet121", "efficientnet_b0", "mobilenetv3_small_100",
            "convnext_atto", "vit_tiny_patch16_224"} <= set(list_image_backbones())
    assert list_heads() == ["classification", "survival"]
    assert list_fusions() == sorted(list_fusions())


def test_registering_a_name_twice_is_an_error(monkeypatch):
    monkeypatch.setattr(registry, "_FUSIONS", dict(registry._FUSIONS))
    register_fusion("mine")(object)
    assert "mine" in list_fusions()
    with pytest.raises(ValueError, match="already registered"):
        register_fusion("attention")(object)


def test_timm_prefix_is_reserved(monkeypatch):
    monkeypatch.setattr(registry, "_IMAGE_BACKBONES", dict(registry._IMAGE_BACKBONES))
    with pytest.raises(ValueError, match="reserved"):
        register_image_backbone("timm:resnet18")


def test_unknown_names_list_what_exists():
    with pytest.raises(ValueError, match=r"unknown fusion 'nope'; registered: \['attention'"):
        registry.get_fusion("nope")
