"""Multimodal models: registries + factory in the timm style (DESIGN.md §4).

``create_model(schema, cfg)`` is the only way to build a model. Encoders, fusions and heads register
themselves by name when this package is imported; ``list_fusions()`` / ``list_image_backbones()``
say what exists (any timm model is also reachable as image backbone ``timm:<name>``).
"""

from . import encoders, fusion, heads  # noqa: F401  (imported for their registrations)
from .fusion import Fusion, FusionOutput
from .model import PARAMETER_GROUPS, FusionModel, create_model, drop_modalities, parameter_group
from .registry import (
    TIMM_PREFIX,
    list_fusions,
    list_heads,
    list_image_backbones,
    register_fusion,
    register_head,
    register_image_backbone,
)

__all__ = [
    "PARAMETER_GROUPS",
    "TIMM_PREFIX",
    "Fusion",
    "FusionModel",
    "FusionOutput",
    "create_model",
    "drop_modalities",
    "list_fusions",
    "list_heads",
    "list_image_backbones",
    "parameter_group",
    "register_fusion",
    "register_head",
    "register_image_backbone",
]
