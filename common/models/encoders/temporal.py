"""Temporal encoders for the ``visits`` modality: a case's sequence of visits -> one (B, out_dim) vector.

Input contract (produced by :class:`fedfusion.common.data.MultimodalDataset`, see
:mod:`fedfusion.common.longitudinal`), T = the schema's ``visits.max_visits``, F = per-visit columns:

- ``batch["visits"]`` float (B, T, 2F): per visit and column [standardised value (0 if missing),
  missing indicator];
- ``batch["visits_time"]`` float (B, T): the visit's time, divided by the site's time scale;
- ``batch["visits_gap"]`` float (B, T): time since the previous visit (0 for the first), same scale;
- ``batch["visits_mask"]`` bool (B, T): True for real visits. Real visits fill the first slots in
  time order, padding follows. A row with no visit at all is a case whose modality is absent: the
  encoder still runs on it (Opacus needs every parameter in every step) and returns a finite vector
  that :class:`~fedfusion.common.models.model.FusionModel` replaces with ``absent.visits``.

Why time-aware: visits are irregular (the first echo after surgery comes after days, later ones after
years), so a step index says little; both encoders see each visit's time and the gap to the previous
one as inputs, and the GRU also decays its state with the gap (GRU-D, Che et al. 2018), so an old
measurement counts for less than a recent one.

Opacus (DP-SGD): plain ``nn.GRU`` has no per-sample gradient rule. :class:`VisitGRU` is a GRU cell
written with ``nn.Linear``: the input projection runs once on the whole (B, T, ·) tensor, the
recurrent projection is Opacus' ``RNNLinear`` (a Linear whose per-sample gradients ACCUMULATE over the
time steps it is called at, which is exactly what its ``DPGRU`` relies on). :class:`VisitTransformer`
calls each layer once on the (B, T, ·) tensor. Only Linear and LayerNorm hold parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from opacus.layers.dp_rnn import RNNLinear
from torch import nn

from ...config import TEMPORAL_ENCODERS, ConfigError


def _visit_inputs(batch: Mapping[str, torch.Tensor], num_features: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, time features (B, T, 2), mask, any-visit row mask), after checking shapes."""
    values, mask = batch.get("visits"), batch.get("visits_mask")
    times, gaps = batch.get("visits_time"), batch.get("visits_gap")
    if values is None or values.ndim != 3 or values.shape[2] != 2 * num_features:
        got = None if values is None else tuple(values.shape)
        raise ValueError(f"batch['visits'] has shape {got}; the schema expects (B, T, {2 * num_features}) "
                         "(value + missing indicator per visit column)")
    shape = tuple(values.shape[:2])
    for key, tensor in (("visits_time", times), ("visits_gap", gaps), ("visits_mask", mask)):
        if tensor is None or tuple(tensor.shape) != shape:
            got = None if tensor is None else tuple(tensor.shape)
            raise ValueError(f"batch['{key}'] has shape {got}; expected {shape} like batch['visits']")
    assert times is not None and gaps is not None and mask is not None
    mask = mask.bool()
    has_any = mask.any(dim=1)
    # a case without visits attends to / runs over its first (all-zero) slot so nothing is NaN
    first = torch.zeros_like(mask)
    first[:, 0] = True
    safe = mask | (first & ~has_any.unsqueeze(1))
    return values.float(), torch.stack([times.float(), gaps.float()], dim=2), safe, has_any


class VisitGRU(nn.Module):
    """Time-aware GRU over visits; the embedding is the state after the last real visit.

    Step input: [values, missing flags, time, gap]. Before each update the state decays by
    ``exp(-softplus(w) * gap)`` per unit (learned ``w``), then the GRU update runs; padded steps leave
    the state unchanged, so left or right padding gives the same result.
    """

    def __init__(self, num_features: int, embed_dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_features, self.hidden_dim = num_features, hidden_dim
        self.input = nn.Linear(2 * num_features + 2, 3 * hidden_dim)
        self.recurrent = RNNLinear(hidden_dim, 3 * hidden_dim)
        self.decay = nn.Linear(1, hidden_dim)  # rate = softplus(decay(gap)) per unit: gap-aware forgetting
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Dropout(dropout), nn.Linear(hidden_dim, embed_dim))
        self.out_dim = embed_dim

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        values, timing, mask, _ = _visit_inputs(batch, self.num_features)
        steps = self.input(torch.cat([values, timing], dim=2))  # (B, T, 3H), one call
        keep = torch.exp(-nn.functional.softplus(self.decay(timing[..., 1:2])))  # (B, T, H), one call
        h = values.new_zeros(values.shape[0], self.hidden_dim)
        for t in range(values.shape[1]):
            h_prev = h * keep[:, t]
            x_r, x_z, x_n = steps[:, t].chunk(3, dim=1)
            h_r, h_z, h_n = self.recurrent(h_prev).chunk(3, dim=1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h = torch.where(mask[:, t : t + 1], (1 - z) * n + z * h_prev, h)
        return self.out(h)


class VisitTransformer(nn.Module):
    """Small transformer over visits with a continuous-time encoding, pooled by masked attention.

    Each visit token = Linear(values, missing flags) + Linear(time, gap, sin/cos of time at
    ``num_frequencies`` scales); pre-norm blocks of multi-head self-attention (padding masked out of
    the keys) and an MLP; pooling weights come from a learned scorer, softmaxed over real visits only.
    """

    def __init__(self, num_features: int, embed_dim: int, hidden_dim: int, dropout: float = 0.0,
                 layers: int = 1, heads: int = 2, num_frequencies: int = 4) -> None:
        super().__init__()
        if embed_dim % heads:
            raise ConfigError(f"model: embed-dim {embed_dim} must be divisible by temporal-heads {heads}")
        self.num_features, self.heads = num_features, heads
        self.register_buffer("frequencies", 2.0 ** torch.arange(num_frequencies, dtype=torch.float32) / 2.0,
                             persistent=False)
        self.value = nn.Linear(2 * num_features, embed_dim)
        self.time = nn.Linear(2 + 2 * num_frequencies, embed_dim)
        self.blocks = nn.ModuleList(_Block(embed_dim, hidden_dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(embed_dim)
        self.score = nn.Linear(embed_dim, 1)
        self.out_dim = embed_dim

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        values, timing, mask, _ = _visit_inputs(batch, self.num_features)
        angles = timing[..., :1] * self.frequencies
        x = self.value(values) + self.time(torch.cat([timing, torch.sin(angles), torch.cos(angles)], dim=2))
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        weights = torch.softmax(self.score(x).squeeze(2).masked_fill(~mask, float("-inf")), dim=1)
        return (weights.unsqueeze(2) * x).sum(dim=1)


class _Block(nn.Module):
    """Pre-norm transformer block; attention written from Linear layers (each called once)."""

    def __init__(self, dim: int, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / (d // self.heads) ** 0.5  # (B, heads, T, T)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.dropout(self.proj(attended))
        return x + self.dropout(self.mlp(self.norm2(x)))


def build_temporal_encoder(kind: str, num_features: int, embed_dim: int, hidden_dim: int, dropout: float,
                           layers: int = 1, heads: int = 2) -> nn.Module:
    """The encoder ``kind`` ("gru" or "transformer"); an unknown name is a :class:`ConfigError`."""
    if kind == "gru":
        return VisitGRU(num_features, embed_dim, hidden_dim, dropout)
    if kind == "transformer":
        return VisitTransformer(num_features, embed_dim, hidden_dim, dropout, layers=layers, heads=heads)
    raise ConfigError(f"model: unknown temporal-encoder {kind!r}; expected one of {list(TEMPORAL_ENCODERS)}")
