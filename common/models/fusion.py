"""Fusion modules: per-modality vectors + presence mask -> one feature vector (or per-modality outputs).

Every fusion receives ``embeddings``: one (B, d_m) tensor per schema modality, in schema order, in
which rows of absent modalities already hold the learned "absent" embedding (unless the fusion says
``uses_absent = False``), and ``mask``: bool (B, M), True where the modality is present after
modality dropout. It returns :class:`FusionOutput`.

Registered fusions (``list_fusions()``):

- ``early``: tabular modalities enter RAW (the clinical vector with one-hot categories, the omics
  vector) through parameter-free identity encoders; the image has no raw vector form and enters via
  its encoder embedding. Concatenated, then a 2-layer MLP.
- ``concat``: intermediate fusion; modality embeddings concatenated, then an MLP.
- ``attention``: per-sample softmax weights over modality embeddings (shared tanh scorer plus a
  learned per-modality prior); absent modalities are masked out of the softmax so their weight is
  exactly 0. Weights are returned for interpretation.
- ``gated``: gated multimodal unit (Arevalo et al. 2017): h_m = tanh(W_m e_m), vector gates
  z_m = sigmoid(W_z[e_1..e_M]) zeroed for absent modalities, fused = sum_m z_m * h_m. The returned
  weights are each modality's mean gate, normalised to sum to 1 over present modalities.
- ``kronecker``: Pathomic-style tensor fusion (Chen et al. 2020): gated projections
  o_m = sigmoid(G_m[e]) * relu(P_m e_m) to a small width d, zeroed for absent modalities, a 1
  appended, then the outer product of all (d+1)-vectors (so every subset of modalities has its own
  interaction terms, and an absent modality leaves exactly the terms of the others); d is chosen so
  the product has about 1024 entries (3 modalities: d=9, 2: d=31).
- ``late``: one head per modality (built by the model), outputs averaged over PRESENT modalities
  only; returns those averaging weights. Absent modalities contribute nothing, so it needs no
  absent embeddings.

Opacus rules followed here: only Linear/Embedding layers hold parameters, no layer is called twice
in one forward (scorers run once on the stacked (B, M, D) tensor), nothing is modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import ModelConfig
from .registry import register_fusion

#: Entries in the kronecker fusion's outer product (the width of its MLP input), roughly.
KRONECKER_BUDGET = 1024


@dataclass
class FusionOutput:
    """``features``: (B, out_dim) fused features for the heads (None for ``late``);
    ``weights``: (B, M) modality weights for interpretation, or None."""

    features: torch.Tensor | None
    weights: torch.Tensor | None = None


class Fusion(nn.Module):
    """Base class. Class attributes tell :func:`create_model` how to build around the fusion."""

    #: clinical/omics enter as raw vectors (identity encoders) instead of learned embeddings.
    raw_tabular: ClassVar[bool] = False
    #: the model replaces absent modalities' embeddings with learned ones before fusion.
    uses_absent: ClassVar[bool] = True
    #: the model builds one head per modality and averages them with ``FusionOutput.weights``.
    per_modality_heads: ClassVar[bool] = False

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__()
        self.modalities = tuple(dims)
        self.out_dim = cfg.hidden_dim

    def forward(self, embeddings: list[torch.Tensor], mask: torch.Tensor) -> FusionOutput:
        raise NotImplementedError


def _mlp(in_dim: int, hidden: int, dropout: float, layers: int = 1) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i in range(layers):
        modules += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*modules)


def _same_width(dims: dict[str, int], fusion: str) -> int:
    widths = set(dims.values())
    if len(widths) != 1:
        raise ValueError(f"fusion '{fusion}' needs equal embedding widths, got {dims}")
    return widths.pop()


def _present_weights(mask: torch.Tensor) -> torch.Tensor:
    """Uniform weights over present modalities: (B, M), rows sum to 1, absent exactly 0."""
    w = mask.float()
    return w / w.sum(dim=1, keepdim=True).clamp_min(1.0)


@register_fusion("early")
class EarlyFusion(Fusion):
    raw_tabular = True

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__(dims, cfg)
        self.mlp = _mlp(sum(dims.values()), cfg.hidden_dim, cfg.dropout, layers=2)

    def forward(self, embeddings: list[torch.Tensor], mask: torch.Tensor) -> FusionOutput:
        return FusionOutput(self.mlp(torch.cat(embeddings, dim=1)))


@register_fusion("concat")
class ConcatFusion(Fusion):
    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__(dims, cfg)
        self.mlp = _mlp(sum(dims.values()), cfg.hidden_dim, cfg.dropout)

    def forward(self, embeddings: list[torch.Tensor], mask: torch.Tensor) -> FusionOutput:
        return FusionOutput(self.mlp(torch.cat(embeddings, dim=1)))


@register_fusion("attention")
class AttentionFusion(Fusion):
    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__(dims, cfg)
        width = _same_width(dims, "attention")
        self.score_hidden = nn.Linear(width, max(8, width // 2))
        self.score_out = nn.Linear(max(8, width // 2), 1)
        self.prior = nn.Embedding(len(dims), 1)  # learned per-modality prior logit
        nn.init.zeros_(self.prior.weight)
        self.post = _mlp(width, cfg.hidden_dim, cfg.dropout)

    def forward(self, embeddings: list[torch.Tensor], mask: torch.Tensor) -> FusionOutput:
        x = torch.stack(embeddings, dim=1)  # (B, M, D)
        # contiguous: Opacus' ghost clipping views embedding indices (an expanded tensor is strided)
        ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1).contiguous()
        scores = self.score_out(torch.tanh(self.score_hidden(x))).squeeze(-1) + self.prior(ids).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        fused = (weights.unsqueeze(-1) * x).sum(dim=1)
        return FusionOutput(self.post(fused), weights)


@register_fusion("gated")
class GatedFusion(Fusion):
    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__(dims, cfg)
        self.width = _same_width(dims, "gated")
        self.proj = nn.ModuleList(nn.Linear(self.width, self.width) for _ in dims)
        self.gate = nn.Linear(len(dims) * self.width, len(dims) * self.width)
        self.post = _mlp(self.width, cfg.hidden_dim, cfg.dropout)

    def forward(self, embeddings: list[torch.Tensor], mask: torch.Tensor) -> FusionOutput:
        h = torch.stack([torch.tanh(p(e)) for p, e in zip(self.proj, embeddings, strict=True)], dim=1)
        z = torch.sigmoid(self.gate(torch.cat(embeddings, dim=1))).view(h.shape)
        z = z * mask.unsqueeze(-1).to(z.dtype)
        fused = (z * h).sum(dim=1)
        mass = z.mean(dim=-1)
        weights = mass / mass.sum(dim=1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
        return FusionOutput(self.post(fused), weights)


def kronecker_width(num_modalities: int, embed_dim: int, budget: int = KRONECKER_BUDGET) -> int:
    """Per-modality width d so that (d + 1) ** M is about ``budget`` (capped at ``embed_dim``)."""
    return max(2, min(embed_dim, int(budget ** (1.0 / num_modalities) + 1e-9) - 1))


@register_fusion("kronecker")
class KroneckerFusion(Fusion):
    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__(dims, cfg)
        self.width = kronecker_width(len(dims), cfg.embed_dim)
        total = sum(dims.values())
        self.proj = nn.ModuleList(nn.Linear(d, self.width) for d in dims.values())
        self.gate = nn.ModuleList(nn.Linear(total, self.width) for _ in dims)
        self.drop = nn.Dropout(cfg.dropout)
        self.post = _mlp((self.width + 1) ** len(dims), cfg.hidden_dim, cfg.dropout)

    def forward(self, embeddings: list[torch.Tensor], mask: torch.Tensor) -> FusionOutput:
        context = torch.cat(embeddings, dim=1)
        ones = context.new_ones(context.shape[0], 1)
        product: torch.Tensor | None = None
        for m, (proj, gate, e) in enumerate(zip(self.proj, self.gate, embeddings, strict=True)):
            o = torch.sigmoid(gate(context)) * torch.relu(proj(e)) * mask[:, m : m + 1].to(e.dtype)
            o = torch.cat([o, ones], dim=1)
            product = o if product is None else (product.unsqueeze(-1) * o.unsqueeze(1)).flatten(1)
        assert product is not None
        return FusionOutput(self.post(self.drop(product)))


@register_fusion("late")
class LateFusion(Fusion):
    uses_absent = False
    per_modality_heads = True

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__(dims, cfg)
        self.out_dim = 0  # heads read the per-modality embeddings directly

    def forward(self, embeddings: list[torch.Tensor], mask: torch.Tensor) -> FusionOutput:
        return FusionOutput(None, _present_weights(mask))
