"""Task heads, registered by task name: ``classification`` -> ``logits``, ``survival`` -> ``risk``.

- ``classification``: Linear -> logits (B, num_classes); class ``i`` is ``schema.classes[i]``; train
  with (class-weighted) cross-entropy.
- ``survival``: Linear without bias -> risk (B,), higher = worse (earlier event); train with the Cox
  partial likelihood, which is invariant to a constant shift, so a bias would get no gradient and,
  under DP-SGD, only noise.

A schema with task ``both`` gets both heads. With ``late`` fusion each task has one head per
modality (:class:`PerModalityHead`), averaged with the fusion's weights over present modalities.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import Schema
from .registry import register_head


class ClassificationHead(nn.Module):
    output_key = "logits"

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class SurvivalHead(nn.Module):
    output_key = "risk"

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, 1, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features).squeeze(-1)


@register_head("classification")
def classification(in_dim: int, schema: Schema) -> ClassificationHead:
    return ClassificationHead(in_dim, schema.num_classes)


@register_head("survival")
def survival(in_dim: int, schema: Schema) -> SurvivalHead:
    return SurvivalHead(in_dim)


def schema_tasks(schema: Schema) -> list[str]:
    """Head names the schema needs, in a fixed order."""
    wanted = (("classification", schema.has_classification), ("survival", schema.has_survival))
    return [task for task, on in wanted if on]


class PerModalityHead(nn.Module):
    """One head per modality (children named by modality, so parameter names reveal the modality);
    output = sum_m weights[:, m] * head_m(embedding_m)."""

    def __init__(self, dims: dict[str, int], build: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.per_modality = nn.ModuleDict({m: build(d) for m, d in dims.items()})
        self.output_key = next(iter(self.per_modality.values())).output_key

    def forward(self, embeddings: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for m, (head, e) in enumerate(zip(self.per_modality.values(), embeddings, strict=True)):
            out = head(e)
            w = weights[:, m].reshape(-1, *([1] * (out.ndim - 1)))
            total = w * out if total is None else total + w * out
        assert total is not None
        return total
