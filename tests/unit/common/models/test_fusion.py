"""Every registered fusion x every missing-modality pattern: shapes, finiteness, gradient flow."""

from __future__ import annotations

import pytest
import torch

from fedfusion.common.config import ModelConfig
from fedfusion.common.models import create_model, list_fusions
from fedfusion.common.models.fusion import kronecker_width

#: name -> which modalities (image, clinical, omics) are present in every row.
MASK_SCENARIOS = {
    "all": (True, True, True),
    "image_missing": (False, True, True),
    "omics_missing": (True, True, False),
    "only_clinical": (False, True, False),
}
WEIGHTED = ("attention", "gated", "late")


def _encoder_grads(model: torch.nn.Module, modality: str) -> list[torch.Tensor | None]:
    return [p.grad for n, p in model.named_parameters() if n.startswith(f"encoders.{modality}.")]


@pytest.mark.parametrize("scenario", list(MASK_SCENARIOS))
@pytest.mark.parametrize("fusion", list_fusions())
def test_forward_backward_for_every_fusion_and_mask(schema, make_batch, fusion, scenario):
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion=fusion, modality_dropout=0.0))
    present = MASK_SCENARIOS[scenario]
    batch = make_batch(schema, batch_size=5, present=present)
    inputs = {"image": batch["image"], "clinical": batch["clinical_num"], "omics": batch["omics"]}
    for tensor in inputs.values():
        tensor.requires_grad_(True)

    out = model(batch)
    (out["logits"].logsumexp(dim=1).sum() + out["risk"].sum()).backward()

    assert out["logits"].shape == (5, schema.num_classes)
    assert out["risk"].shape == (5,)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert ("modality_weights" in out) == (fusion in WEIGHTED)
    for modality, on in zip(schema.modalities, present, strict=True):
        grads = _encoder_grads(model, modality) + [inputs[modality].grad]  # early: identity encoders
        if on:
            assert all(g is not None for g in grads), f"no gradient reaches {modality}"
            assert any(g.abs().sum() > 0 for g in grads), f"no gradient reaches {modality}"
        else:
            assert all(g is None or torch.count_nonzero(g) == 0 for g in grads), f"absent {modality} learns"


@pytest.mark.parametrize("fusion", WEIGHTED)
def test_modality_weights_sum_to_one_and_are_zero_for_absent(schema, make_batch, fusion):
    model = create_model(schema, ModelConfig(fusion=fusion)).eval()
    batch = make_batch(schema, batch_size=16, seed=3)  # random per-row masks

    weights = model(batch)["modality_weights"]

    assert weights.shape == (16, 3)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(16))
    assert torch.all(weights[~batch["mask"]] == 0)
    assert torch.all(weights[batch["mask"]] > 0)


def test_attention_weights_depend_on_the_sample(schema, make_batch):
    model = create_model(schema, ModelConfig(fusion="attention")).eval()
    weights = model(make_batch(schema, batch_size=8, present=(True, True, True)))["modality_weights"]
    assert weights.std(dim=0).max() > 0


def test_fused_output_ignores_absent_inputs_for_attention(schema, make_batch):
    """Whatever an absent modality's tensor holds, masked attention output must not change."""
    model = create_model(schema, ModelConfig(fusion="attention")).eval()
    batch = make_batch(schema, batch_size=4, present=(True, True, False))
    noisy = dict(batch, omics=torch.randn_like(batch["omics"]) * 100)
    torch.testing.assert_close(model(batch)["logits"], model(noisy)["logits"])


@pytest.mark.parametrize(("modalities", "expected"), [(1, 64), (2, 31), (3, 9)])
def test_kronecker_width_keeps_the_tensor_product_small(modalities, expected):
    width = kronecker_width(modalities, embed_dim=64)
    assert width == expected
    assert (width + 1) ** modalities <= 1100
