"""2-D slice pooling for volumes: one shared 2-D backbone over the D slices, then pooling over slices.

The alternative to a 3-D CNN (``cnn3d_small``) when a volume has few, thick slices, or when a 2-D
backbone's local pretrained weights (ImageNet ResNet, a 2-D pathology model) should be reused: the
slices of a (B, C, D, H, W) volume go one at a time through the same 2-D backbone, and the D slice
features are pooled into one vector, by their mean or by learned attention (a softmax over slices of
a linear score, so the model can attend to the slices that hold the lesion).

Opacus: the backbone runs once per slice on a (B, C, H, W) batch, never on a (B*D, ...) batch, so each
layer's per-sample gradients keep the batch's B rows (Opacus sums them over the D calls); stacking the
slices into the batch would give per-*slice* gradients and break the clipping. GroupNorm backbones
only, like every image backbone (see :func:`register_image_backbone`).

Names: ``cnn_small_slices`` (attention) and ``cnn_small_slices_mean`` are registered (volumetric);
any 2-D backbone, registered or ``timm:<name>``, is reachable as ``slices:<backbone>`` (attention) or
``slices_mean:<backbone>`` (mean), e.g. ``slices:resnet18`` with ``pretrained-path`` pointing at a
2-D ResNet-18 file.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from torch import nn

from ...config import ConfigError, ImageSpec
from ..registry import register_image_backbone

Pooling = Literal["attention", "mean"]
#: Name prefixes that build slice pooling over any 2-D backbone, and the pooling each selects.
SLICE_PREFIXES: dict[str, Pooling] = {"slices:": "attention", "slices_mean:": "mean"}


class SlicePooling(nn.Module):
    """(B, C, D, H, W) -> (B, F): ``backbone`` on each slice (B, C, H, W), then mean/attention over D."""

    volumetric = True

    def __init__(self, backbone: nn.Module, pooling: Pooling = "attention") -> None:
        super().__init__()
        if pooling not in ("attention", "mean"):
            raise ConfigError(f"model: slice pooling must be 'attention' or 'mean', got {pooling!r}")
        self.slice = backbone
        self.pooling = pooling
        self.num_features = int(getattr(backbone, "num_features", 0)) or None
        self.score: nn.Linear | None = None
        inner_blocks = getattr(backbone, "block_names", None)
        if inner_blocks is not None:  # freezing by blocks (transfer.py) sees the 2-D backbone's stages
            self.block_names = [f"slice.{b}" for b in inner_blocks]

    def build_score(self, num_features: int) -> None:
        """Attention scorer over slice features (width known only after a first forward)."""
        if self.pooling == "attention":
            self.score = nn.Linear(num_features, 1)
            nn.init.zeros_(self.score.weight)  # starts as the mean; learns which slices matter
            nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # (B, C, H, W): a single slice, as 3-D backbones accept too
            x = x.unsqueeze(2)
        if x.ndim != 5:
            raise ValueError(f"slice pooling expects (B, C, D, H, W) volumes, got shape {tuple(x.shape)}")
        features = torch.stack([self.slice(x[:, :, d]) for d in range(x.shape[2])], dim=1)  # (B, D, F)
        if self.pooling == "mean" or self.score is None:
            return features.mean(dim=1)
        weights = torch.softmax(self.score(features).squeeze(-1), dim=1)  # (B, D)
        return (weights.unsqueeze(-1) * features).sum(dim=1)


def build_slice_pooling(backbone_name: str, image: ImageSpec, pooling: Pooling,
                        pretrained_path: str | None = None, min_fraction: float = 1.0) -> SlicePooling:
    """Slice pooling over the 2-D backbone ``backbone_name``; ``pretrained_path`` loads into that backbone."""
    from .image import build_image_backbone

    if backbone_name.startswith(tuple(SLICE_PREFIXES)):
        raise ConfigError(f"model: slice pooling over slice pooling ('{backbone_name}') makes no sense")
    flat = replace(image, depth=0)  # each slice is a 2-D image of the volume's channels and size
    inner = build_image_backbone(backbone_name, flat, pretrained_path, min_fraction=min_fraction)
    if getattr(inner, "volumetric", False):
        raise ConfigError(f"model: slice pooling needs a 2-D backbone, '{backbone_name}' is volumetric")
    pooled = SlicePooling(inner, pooling)
    with torch.no_grad():
        was_training = inner.training
        inner.eval()
        width = int(inner(torch.zeros(2, image.channels, *image.size)).shape[1])
        inner.train(was_training)
    pooled.build_score(width)
    return pooled


@register_image_backbone("cnn_small_slices", volumetric=True)
def cnn_small_slices(image: ImageSpec, pretrained_path: str | None = None, min_fraction: float = 1.0) -> nn.Module:
    """``cnn_small`` on every slice, attention pooling over slices."""
    return build_slice_pooling("cnn_small", image, "attention", pretrained_path, min_fraction)


@register_image_backbone("cnn_small_slices_mean", volumetric=True)
def cnn_small_slices_mean(image: ImageSpec, pretrained_path: str | None = None,
                          min_fraction: float = 1.0) -> nn.Module:
    """``cnn_small`` on every slice, mean pooling over slices."""
    return build_slice_pooling("cnn_small", image, "mean", pretrained_path, min_fraction)
