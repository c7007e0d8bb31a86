"""One real Opacus DP-SGD step (hooks mode) for every image backbone and every fusion.

``ModuleValidator.validate`` alone is not enough: most timm CNNs pass it and still fail at the
first backward (shared/OPACUS-TIMM.md), so each test makes a model private, runs forward, a loss,
backward and an optimizer step, and checks per-sample gradients existed and parameters moved.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedfusion.common.config import ModelConfig, Schema
from fedfusion.common.models import create_model, list_fusions, list_image_backbones
from fedfusion.common.privacy import make_private
from tests.opacus_step import ce_plus_cox, one_private_step

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),  # first layer's input
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),  # ViT via functorch
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]


def _samples(schema: Schema, make_batch, n: int = 8) -> list[dict[str, torch.Tensor]]:
    batch = make_batch(schema, batch_size=n, seed=1)
    batch["label"] = torch.arange(n) % schema.num_classes
    batch["event"] = (torch.arange(n) % 3 != 0).float()
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _one_private_step(schema: Schema, cfg: ModelConfig, make_batch) -> None:
    torch.manual_seed(0)
    step = one_private_step(create_model(schema, cfg), _samples(schema, make_batch), ce_plus_cox)
    assert step.missing == [], f"no per-sample gradient for {step.missing[:5]}"
    assert step.unchanged == []


@pytest.mark.parametrize("backbone", [*list_image_backbones(), "timm:regnetx_002"])
def test_private_step_for_every_image_backbone(schema, make_batch, backbone):
    _one_private_step(schema, ModelConfig(fusion="attention", image_backbone=backbone), make_batch)


@pytest.mark.parametrize("fusion", list_fusions())
def test_private_step_for_every_fusion(schema, make_batch, fusion):
    _one_private_step(schema, ModelConfig(fusion=fusion, image_backbone="cnn_small"), make_batch)


@pytest.mark.parametrize("fusion", list_fusions())
def test_ghost_clipping_step_for_every_fusion(schema, make_batch, fusion):
    """Ghost clipping (classification losses) must not fall back to hooks for any fusion: Opacus'
    ghost rules view embedding indices, so strided index tensors would silently cost the fast path.
    Classification only: ghost clipping needs every parameter in the (per-sample) loss."""
    schema = dataclasses.replace(schema, task="classification")
    torch.manual_seed(0)
    model = create_model(schema, ModelConfig(fusion=fusion, image_backbone="cnn_small"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp = make_private(model, _samples(schema, make_batch), torch.optim.SGD(model.parameters(), lr=0.05), None,
                      batch_size=4, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost",
                      separable_loss=True, secret_seed=0)
    assert dp.grad_sample_mode == "ghost"
    batch = next(b for b in dp.loader if len(b["mask"]) > 0)
    dp.optimizer.zero_grad()
    dp.loss_fn(dp.module(batch), batch).backward()
    dp.optimizer.step()
    assert dp.steps_taken() == 1
    assert [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])] == []
