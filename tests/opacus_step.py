"""One real Opacus DP-SGD step through the site's own wrapping (``common/privacy.make_private``:
Poisson loader over dict samples, secret noise), and what it left behind: which parameters had no
per-sample gradient, which had one not per case, which did not move.

Why a helper: ``ModuleValidator.validate`` alone is not enough (most timm CNNs pass it and fail at the
first backward, shared/OPACUS-TIMM.md), so every encoder, fusion and temporal model is checked by
running the step for real; each test asserts on the returned lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedfusion.common.privacy import make_private

Batch = dict[str, torch.Tensor]


def ce_plus_cox(out: Batch, batch: Batch) -> torch.Tensor:
    """Cross-entropy + a Cox-style partial likelihood (rows taken as ordered by time, ties ignored)."""
    risk = out["risk"]
    log_cum = torch.logcumsumexp(risk.flip(0), dim=0).flip(0)
    cox = -((risk - log_cum) * batch["event"]).sum() / batch["event"].sum().clamp_min(1)
    return F.cross_entropy(out["logits"], batch["label"]) + cox


@dataclass
class PrivateStep:
    batch: Batch
    missing: list[str]  # parameters without a per-sample gradient
    wrong_rows: list[str]  # per-sample gradients with another row count than the batch
    unchanged: list[str]  # parameters the step did not move (noise should reach every one)
    steps: int


def one_private_step(module: nn.Module, samples: Sequence[Batch], loss: Callable[[Any, Batch], torch.Tensor], *,
                     lr: float = 0.05, rows_key: str = "mask", min_rows: int = 1) -> PrivateStep:
    """Make ``module`` private (hooks mode, batch 4, noise 1.0, clip 1.0), run forward, ``loss``,
    backward and one optimizer step on the first Poisson batch with at least ``min_rows`` rows."""
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    dp = make_private(module, samples, torch.optim.SGD(module.parameters(), lr=lr), loss, batch_size=4,
                      noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks", secret_seed=0)
    batch = next(b for b in dp.loader if len(b[rows_key]) >= min_rows)
    dp.optimizer.zero_grad()
    loss(dp.module(batch), batch).backward()
    rows = len(batch[rows_key])
    missing = [n for n, p in module.named_parameters() if getattr(p, "grad_sample", None) is None]
    wrong_rows = [n for n, p in module.named_parameters()
                  if getattr(p, "grad_sample", None) is not None and p.grad_sample.shape[0] != rows]
    dp.optimizer.step()
    steps = dp.steps_taken()
    dp.close()
    unchanged = [n for n, p in module.named_parameters() if torch.equal(p.detach(), before[n])]
    return PrivateStep(batch, missing, wrong_rows, unchanged, steps)
