"""Optimiser choice, learning-rate schedules and per-group learning rates (common/training.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from fedfusion.client.runtime import round_schedule
from fedfusion.common.config import ClinicalColumn, ConfigError, ImageSpec, ModelConfig, Schema, TrainConfig
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.models import create_model
from fedfusion.common.privacy import make_private
from fedfusion.common.training import LossFunction, fit, lr_factor, make_optimizer, set_lr_factor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMA = Schema(name="opt", task="classification", classes=("a", "b"), clinical=(ClinicalColumn("x"),),
                image=ImageSpec(size=(16, 16)))


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                           ("sgd", torch.optim.SGD), ("rmsprop", torch.optim.RMSprop)])
def test_each_optimizer_is_built_with_the_configured_settings(name, cls):
    cfg = TrainConfig(optimizer=name, lr=0.01, momentum=0.8, weight_decay=0.001)
    optimizer = make_optimizer(nn.Linear(3, 2), cfg)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.001
    if name in ("sgd", "rmsprop"):
        assert group["momentum"] == 0.8


def test_unknown_optimizer_or_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="lr-schedule must be one of"):
        TrainConfig(lr_schedule="onecycle")


def test_schedules_follow_their_formulas():
    cos = TrainConfig(lr_schedule="cosine", lr_min_factor=0.1)
    assert lr_factor(cos, 0, 10) == 1.0
    assert lr_factor(cos, 5, 10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cos, 10, 10) == pytest.approx(0.1) == lr_factor(cos, 50, 10)  # stays at the floor
    step = TrainConfig(lr_schedule="step", lr_step_size=3, lr_gamma=0.5)
    assert [lr_factor(step, s, 10) for s in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    warm = TrainConfig(lr_schedule="warmup_cosine", lr_warmup=4)
    assert [lr_factor(warm, s, 12) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(warm, 8, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(TrainConfig(), 7, 10) == 1.0


def test_backbone_gets_its_own_scaled_learning_rate_and_frozen_parameters_are_left_out():
    model = create_model(SCHEMA, ModelConfig(freeze_backbone=False))
    cfg = TrainConfig(lr=0.01, backbone_lr_scale=0.1)
    optimizer = make_optimizer(model, cfg)
    backbone_ids = {id(p) for p in model.encoders["image"].backbone.parameters()}
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert [lrs[i] for i in backbone_ids] == pytest.approx([0.001] * len(backbone_ids))
    assert {lr for i, lr in lrs.items() if i not in backbone_ids} == {0.01}

    frozen = create_model(SCHEMA, ModelConfig(freeze_backbone=True))
    optimizer = make_optimizer(frozen, cfg)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in frozen.encoders["image"].backbone.parameters()}
    assert len(optimizer.param_groups) == 1


def test_schedule_position_scales_every_group():
    model = create_model(SCHEMA, ModelConfig())
    cfg = TrainConfig(lr=0.01, backbone_lr_scale=0.5, lr_schedule="step", lr_step_size=1, lr_gamma=0.5)
    optimizer = make_optimizer(model, cfg, step=2, total=5)
    assert sorted(g["lr"] for g in optimizer.param_groups) == [pytest.approx(0.00125), pytest.approx(0.0025)]
    set_lr_factor(optimizer, 1.0)
    assert sorted(g["lr"] for g in optimizer.param_groups) == [pytest.approx(0.005), pytest.approx(0.01)]


def test_run_config_keys_reach_train_config_and_rounds_are_the_schedule_unit():
    cfg = FederationConfig.from_run_config({"local-optimizer": "sgd", "local-momentum": 0.5, "lr-schedule": "cosine",
                                            "lr-min-factor": 0.2, "num-server-rounds": 4, "backbone-lr-scale": 0.1,
                                            "freeze-backbone": True, "trainable-blocks": 2})
    train = cfg.train
    assert (train.optimizer, train.momentum, train.lr_schedule, train.lr_min_factor) == ("sgd", 0.5, "cosine", 0.2)
    assert train.lr_horizon == 4 and train.backbone_lr_scale == 0.1
    assert cfg.model.freeze_backbone and cfg.model.trainable_blocks == 2 and cfg.model.pretrained_path is None
    lrs = [make_optimizer(nn.Linear(2, 2), train, **round_schedule(train, r)).param_groups[0]["lr"]
           for r in range(1, 5)]
    assert lrs[0] == pytest.approx(train.lr) and lrs == sorted(lrs, reverse=True) and lrs[-1] > 0.2 * train.lr


def test_fit_applies_the_schedule_per_epoch():
    from tests.unit.common.models.conftest import random_batch

    batch = random_batch(SCHEMA, batch_size=8, present=(True, True))
    batch["label"] = torch.arange(8) % 2
    samples = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    model = create_model(SCHEMA, ModelConfig())
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.01, lr_schedule="step", lr_step_size=1, lr_gamma=0.5,
                      optimizer="sgd", device="cpu")
    loader = torch.utils.data.DataLoader(samples, batch_size=4)
    result = fit(model, loader, None, cfg, LossFunction(SCHEMA))
    assert [row["lr"] for row in result.history] == [pytest.approx(v) for v in (0.01, 0.005, 0.0025)]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
def test_dp_step_keeps_the_scheduled_rates_and_skips_frozen_parameters():
    """Opacus wraps our optimizer: its param groups (and their scheduled lr) are what it steps with."""
    from tests.unit.common.models.conftest import random_batch

    torch.manual_seed(0)
    model = create_model(SCHEMA, ModelConfig(freeze_backbone=True, modality_dropout=0.0))
    batch = random_batch(SCHEMA, batch_size=8, present=(True, True))
    batch["label"] = torch.arange(8) % 2
    samples = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    cfg = replace(TrainConfig(lr=0.1, optimizer="rmsprop", lr_schedule="cosine"), lr_horizon=4)
    optimizer = make_optimizer(model, cfg, **round_schedule(cfg, 3))
    expected = [g["lr"] for g in optimizer.param_groups]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn = LossFunction(SCHEMA)
    dp = make_private(model, samples, optimizer, loss_fn, batch_size=4, noise_multiplier=1.0,
                      max_grad_norm=1.0, secret_seed=0)
    batch = next(b for b in dp.loader if len(b["mask"]) > 0)
    dp.optimizer.zero_grad()
    loss_fn(dp.module(batch), batch).backward()
    dp.optimizer.step()
    dp.close()

    assert [g["lr"] for g in dp.optimizer.param_groups] == expected == [pytest.approx(0.1 * 0.5 * (1 + math.cos(
        math.pi * 0.5)))]
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert not any(n.startswith("encoders.image.backbone.") for n in moved)
    assert any(n.startswith("heads.") for n in moved)


@pytest.mark.parametrize("image_encoders", ["separate", "shared"])
def test_every_sequence_backbone_gets_the_backbone_learning_rate(image_encoders):
    """Multi-sequence schemas name backbones ``encoders.image:<seq>.backbone.``: each is a backbone."""
    schema = Schema.from_dict({"name": "mri", "task": "classification", "classes": ["a", "b"],
                               "clinical": [{"name": "x"}],
                               "images": [{"name": "t1", "size": [16, 16]}, {"name": "flair", "size": [16, 16]}]})
    model = create_model(schema, ModelConfig(image_encoders=image_encoders, freeze_backbone=False))
    optimizer = make_optimizer(model, TrainConfig(lr=0.01, backbone_lr_scale=0.1))
    backbone = {id(p) for n, p in model.named_parameters() if ".backbone." in n}
    assert backbone, "the image encoders have a backbone"
    if image_encoders == "separate":
        assert {n.split(".")[1] for n, _ in model.named_parameters() if ".backbone." in n} == {"image:t1",
                                                                                               "image:flair"}
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert [lrs[i] for i in backbone] == pytest.approx([0.001] * len(backbone))
    assert {lr for i, lr in lrs.items() if i not in backbone} == {0.01}
