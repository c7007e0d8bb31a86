"""A small 3-D CNN for volumes (CT, MRI): Conv3d + GroupNorm, Opacus- and FedAvg-ready by design.

Registered as image backbone ``cnn3d_small``; a schema whose image has ``depth`` > 0 feeds it
``(B, C, D, H, W)`` volumes (``common/volumes.py``). GroupNorm rather than BatchNorm for the same
reasons as the 2-D encoders (per-sample gradients under Opacus, no running statistics to average).
A 2-D batch ``(B, C, H, W)`` is taken as a volume of one slice, so the backbone also runs, and is
tested, wherever 2-D backbones are.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import ImageSpec
from ..registry import register_image_backbone
from .image import conv_gn_stages


class SmallCNN3D(nn.Module):
    """Four 3x3x3 conv + GroupNorm + ReLU stages (widths 8-16-32-64, stride 2 after the first) and
    global average pooling: ~90k parameters, small enough for CPU training on 32^3 volumes."""

    volumetric = True

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.features, self.num_features = conv_gn_stages(nn.Conv3d, in_chans, widths)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.block_names = [f"features.{3 * i}" for i in range(len(widths))]  # stages, for trainable-blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # (B, C, H, W): one slice
            x = x.unsqueeze(2)
        return self.pool(self.features(x)).flatten(1)


@register_image_backbone("cnn3d_small", volumetric=True)
def cnn3d_small(image: ImageSpec, pretrained_path: str | None = None, min_fraction: float = 1.0) -> nn.Module:
    from .image import load_local_weights

    model = SmallCNN3D(image.channels)
    if pretrained_path:
        load_local_weights(model, pretrained_path, "cnn3d_small", min_fraction=min_fraction)
    return model
