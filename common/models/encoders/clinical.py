"""Clinical encoders: numeric values with missing indicators plus categorical columns.

Input contract (produced by the data loader): ``batch["clinical_num"]`` float (B, schema.clinical_width)
holding, per numeric column in schema order, [standardised value (0 if missing), missing indicator];
``batch["clinical_cat"]`` long (B, number of categorical columns) holding the category index PLUS ONE,
0 meaning missing/unknown. A schema may have only numeric or only categorical columns; the unused
tensor may then be absent or have width 0.

Index 0 of each categorical embedding is a *learned* "missing" vector rather than a frozen
``padding_idx`` row: Opacus' per-sample gradient rule for ``nn.Embedding`` ignores ``padding_idx``
and DP noise is added to the whole table anyway, so a "fixed zero" row would drift under DP-SGD;
learning it keeps DP and non-DP training consistent and lets missingness carry signal, as the
numeric missing indicators do.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig, Schema


def _clinical_inputs(batch: Mapping[str, torch.Tensor], num_width: int, num_cat: int
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    num = batch.get("clinical_num") if num_width else None
    cat = batch.get("clinical_cat") if num_cat else None
    if num_width and (num is None or num.ndim != 2 or num.shape[1] != num_width):
        got = None if num is None else tuple(num.shape)
        raise ValueError(f"batch['clinical_num'] has shape {got}; the schema expects (B, {num_width}) "
                         "(value + missing indicator per numeric column)")
    if num_cat and (cat is None or cat.ndim != 2 or cat.shape[1] != num_cat):
        got = None if cat is None else tuple(cat.shape)
        raise ValueError(f"batch['clinical_cat'] has shape {got}; the schema expects (B, {num_cat}) "
                         "(category index + 1 per categorical column, 0 = missing)")
    return (None if num is None else num.float()), (None if cat is None else cat.long())


class ClinicalEncoder(nn.Module):
    """MLP over [numeric values + missing indicators, one embedding per categorical column].

    Linear -> LayerNorm -> ReLU -> Dropout -> Linear to ``embed_dim``; no BatchNorm (Opacus).
    """

    def __init__(self, schema: Schema, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_width = schema.clinical_width
        self.embeddings = nn.ModuleList(
            nn.Embedding(len(col.categories) + 1, cfg.categorical_embed_dim)
            for col in schema.categorical_columns
        )
        in_dim = self.num_width + len(self.embeddings) * cfg.categorical_embed_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden_dim),
            nn.LayerNorm(cfg.hidden_dim),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden_dim, cfg.embed_dim),
        )
        self.out_dim = cfg.embed_dim

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        num, cat = _clinical_inputs(batch, self.num_width, len(self.embeddings))
        parts = [] if num is None else [num]
        # contiguous: Opacus' ghost clipping views embedding indices (a column slice is strided)
        parts += [emb(cat[:, j].contiguous()) for j, emb in enumerate(self.embeddings)]
        return self.mlp(torch.cat(parts, dim=1))


class ClinicalRaw(nn.Module):
    """Parameter-free "encoder" for early fusion: the clinical vector itself, categorical columns
    one-hot encoded (including the missing slot 0). Width: ``clinical_width + sum(categories + 1)``."""

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        self.num_width = schema.clinical_width
        self.cardinalities = [len(col.categories) + 1 for col in schema.categorical_columns]
        self.out_dim = self.num_width + sum(self.cardinalities)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        num, cat = _clinical_inputs(batch, self.num_width, len(self.cardinalities))
        parts = [] if num is None else [num]
        parts += [F.one_hot(cat[:, j], n).float() for j, n in enumerate(self.cardinalities)]
        return torch.cat(parts, dim=1)
