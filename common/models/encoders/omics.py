"""Omics encoders: a self-normalising network (Klambauer et al. 2017) over standardised features.

``batch["omics"]`` is float (B, len(schema.omics)), standardised, 0 where missing. SELU activations
with LeCun-normal initialisation keep activations near zero mean / unit variance without any
normalisation layer (nothing Opacus must special-case), and AlphaDropout preserves that property.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ...config import ModelConfig


def _omics_input(batch: Mapping[str, torch.Tensor], width: int) -> torch.Tensor:
    omics = batch.get("omics")
    if omics is None or omics.ndim != 2 or omics.shape[1] != width:
        got = None if omics is None else tuple(omics.shape)
        raise ValueError(f"batch['omics'] has shape {got}; the schema expects (B, {width})")
    return omics.float()


class OmicsEncoder(nn.Module):
    """Linear-SELU-AlphaDropout x2, then Linear to ``embed_dim``; LeCun-normal weights, zero biases."""

    def __init__(self, num_features: int, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_dim
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.SELU(),
            nn.AlphaDropout(cfg.dropout),
            nn.Linear(hidden, hidden),
            nn.SELU(),
            nn.AlphaDropout(cfg.dropout),
            nn.Linear(hidden, cfg.embed_dim),
        )
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, 0.0, 1.0 / math.sqrt(layer.in_features))
                nn.init.zeros_(layer.bias)
        self.num_features = num_features
        self.out_dim = cfg.embed_dim

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.net(_omics_input(batch, self.num_features))


class OmicsRaw(nn.Module):
    """Parameter-free "encoder" for early fusion: the standardised omics vector itself."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = self.out_dim = num_features

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _omics_input(batch, self.num_features)
