"""Task heads."""

from __future__ import annotations

import torch

from fedfusion.common.models.heads import ClassificationHead, PerModalityHead, SurvivalHead, schema_tasks


def test_heads_shapes_and_survival_has_no_bias():
    features = torch.randn(5, 8)
    assert ClassificationHead(8, 3)(features).shape == (5, 3)
    survival = SurvivalHead(8)
    assert survival(features).shape == (5,)
    assert survival.linear.bias is None  # Cox likelihood is shift invariant


def test_per_modality_head_is_the_weighted_average_of_modality_heads():
    head = PerModalityHead({"image": 4, "omics": 6}, lambda d: ClassificationHead(d, 2))
    embeddings = [torch.randn(3, 4), torch.randn(3, 6)]
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])

    out = head(embeddings, weights)

    a, b = (h(e) for h, e in zip(head.per_modality.values(), embeddings, strict=True))
    torch.testing.assert_close(out, weights[:, :1] * a + weights[:, 1:] * b)
    assert head.output_key == "logits"


def test_schema_tasks(schema):
    assert schema_tasks(schema) == ["classification", "survival"]
