"""An image encoder and a fusion for fedfusion, registered under names no built-in uses.

Both follow the contracts of docs/plugins.md: no BatchNorm (GroupNorm keeps per-sample statistics, so
Opacus' per-sample gradients stay exact and FedAvg has no running statistics to average), no layer
called twice per forward, nothing modified in place, parameters only in layers Opacus knows.
"""

from __future__ import annotations

import torch
from torch import nn

from fedfusion.common.config import ImageSpec, ModelConfig
from fedfusion.common.models import Fusion, FusionOutput, register_fusion, register_image_backbone


class TinyCNN(nn.Module):
    """Two 3x3 conv + GroupNorm + ReLU stages (8 and 16 channels, the second with stride 2) and global
    average pooling: (B, C, H, W) -> (B, 16), about 1.4k parameters. A sketch to copy, not a model to use."""

    def __init__(self, in_chans: int = 1, widths: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
                                  nn.GroupNorm(4, widths[0]), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1, bias=False),
                                   nn.GroupNorm(4, widths[1]), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[1]
        self.block_names = ["stem", "stage"]  # input side first: `trainable-blocks = 1` trains only "stage"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage(self.stem(x))).flatten(1)


@register_image_backbone("example_tinycnn")
def example_tinycnn(image: ImageSpec, pretrained_path: str | None = None) -> nn.Module:
    """fedfusion calls this with the schema's image spec (channels, size) and `pretrained-path`."""
    model = TinyCNN(image.channels)
    if pretrained_path:  # a local file only: nothing is ever downloaded at a hospital site
        model.load_state_dict(torch.load(pretrained_path, map_location="cpu", weights_only=True))
    return model


@register_fusion("example_mean")
class MeanFusion(Fusion):
    """The mean of the PRESENT modalities' embeddings (all of one width), then Linear + ReLU.

    Returns the averaging weights (1/k over the k present modalities, 0 for absent ones) for the
    explanations fedfusion writes; absent modalities contribute nothing, so no absent embedding is needed.
    """

    uses_absent = False

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__(dims, cfg)
        widths = set(dims.values())
        if len(widths) != 1:
            raise ValueError(f"fusion 'example_mean' needs equal embedding widths, got {dims}")
        self.post = nn.Sequential(nn.Linear(widths.pop(), cfg.hidden_dim), nn.ReLU())

    def forward(self, embeddings: list[torch.Tensor], mask: torch.Tensor) -> FusionOutput:
        weights = mask.float() / mask.float().sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, M)
        fused = (weights.unsqueeze(-1) * torch.stack(embeddings, dim=1)).sum(dim=1)  # (B, D)
        return FusionOutput(self.post(fused), weights)
