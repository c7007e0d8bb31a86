"""Train and evaluate the fusion model on one site's data (or the pooled data).

The same functions serve pooled, local-only and federated training, so every federated result
is compared with baselines trained by identical code (FLamby's rule). A federated client calls
:func:`train_epochs` for its E local epochs; the pooled/local baseline calls :func:`fit`, which
adds early stopping on the validation split.

Survival uses the Cox partial likelihood with Breslow's handling of tied times, computed within
a mini-batch (the usual stochastic approximation; batches need at least one event to contribute).
"""

from __future__ import annotations

import copy
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fedfusion.common.config import Schema, TrainConfig
from fedfusion.common.metrics import classification_report, survival_report


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present (a site's GPU), then Apple MPS, else CPU."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run with the same seed gives the same weights."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cox_partial_likelihood(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox log partial likelihood (Breslow ties), averaged over events.

    ``risk`` is the log hazard ratio (higher = earlier event). Returns 0 (with a gradient path)
    when the batch holds no event, so a batch of censored cases is harmless.
    """
    risk = risk.float().reshape(-1)
    time = time.float().reshape(-1)
    event = event.float().reshape(-1)
    # Risk set of case i: every j with time_j >= time_i (Breslow: tied times share one risk set).
    at_risk = (time.unsqueeze(0) >= time.unsqueeze(1)).float()
    log_denominator = torch.logsumexp(risk.unsqueeze(0) + torch.log(at_risk + 1e-45), dim=1)
    n_events = event.sum()
    loss = -((risk - log_denominator) * event).sum()
    return loss / n_events.clamp(min=1.0)


def class_weights_for(labels: np.ndarray, num_classes: int) -> Tensor:
    """Inverse-frequency weights (mean 1) so a minority class is not ignored; absent classes get 1."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class LossFunction:
    """The task loss for a schema: CE (optionally class-weighted), Cox, or their sum for 'both'."""

    schema: Schema
    class_weights: Tensor | None = None

    def __call__(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        loss = torch.zeros((), device=next(iter(outputs.values())).device)
        if self.schema.has_classification:
            weight = None if self.class_weights is None else self.class_weights.to(loss.device)
            loss = loss + nn.functional.cross_entropy(outputs["logits"].float(), batch["label"], weight=weight)
        if self.schema.has_survival:
            loss = loss + cox_partial_likelihood(outputs["risk"], batch["time"], batch["event"])
        return loss


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_loader(dataset: Any, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """Seeded loader; with a GPU present its batches come in pinned (page-locked) memory, so
    :func:`to_device`'s ``non_blocking`` copies overlap the previous step instead of waiting for it."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, drop_last=False, pin_memory=torch.cuda.is_available())


#: glibc ``mallopt`` parameters (malloc.h): freed heap above this stays in the process; allocations below it
#: come from the heap rather than from a fresh ``mmap``.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_TUNED: list[bool] = []


def keep_freed_memory_for_reuse() -> bool:
    """Let this process reuse the memory of one training step in the next (glibc only; once per process).

    Why: a step allocates multi-MB tensors (activations, per-sample norms, gradients). glibc serves each
    from its own ``mmap`` and returns it to the OS when freed, so the next step page-faults the same
    megabytes back in. Measured on the default model, CPU, batch 64: a DP (fused) step 73-78 ms -> 54-58 ms,
    a plain step 46 -> 37-40 ms (benchmarks/dp_overhead.py). The price: the process keeps its peak heap
    (up to 1 GiB is not trimmed), which a training process reaches every step anyway. Returns whether
    the allocator was tuned (False off glibc, e.g. macOS; nothing else changes there).
    """
    if _ALLOCATOR_TUNED:
        return _ALLOCATOR_TUNED[0]
    tuned = False
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
            tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except OSError:
        tuned = False
    _ALLOCATOR_TUNED.append(tuned)
    return tuned


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFunction,
    epochs: int,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
    proximal_mu: float = 0.0,
    start_epoch: int = 0,
    *,
    amp: bool = True,
    on_empty_batch: Callable[[], None] | None = None,
) -> list[float]:
    """Run ``epochs`` passes; return the mean training loss of each.

    AMP (bfloat16 autocast) is used on CUDA only, and only with ``amp``. ``proximal_mu`` > 0 adds
    FedProx's ``mu/2 * ||w - w_global||^2`` with the weights the call started from as ``w_global``.

    The same loop runs DP-SGD: pass Opacus' private model, optimizer, loader and loss (see
    ``common.privacy.make_private``), ``amp=False`` (per-sample gradients in float32),
    ``proximal_mu=0`` (the private optimizer applies FedProx's term itself) and
    ``on_empty_batch``, called instead of skipping an empty Poisson batch.
    """
    keep_freed_memory_for_reuse()
    model.to(device).train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    use_amp = amp and device.type == "cuda"
    losses: list[float] = []
    for epoch in range(start_epoch, start_epoch + epochs):
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        total, count = 0.0, 0
        for batch in loader:
            batch = to_device(batch, device)
            if batch["mask"].shape[0] == 0:  # Poisson sampling can yield an empty batch
                if on_empty_batch is not None:
                    optimizer.zero_grad(set_to_none=True)
                    on_empty_batch()
                continue
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                outputs = model(batch)
            loss = loss_fn(outputs, batch)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            value = loss.detach()  # (Opacus' ghost-clipping loss is not a tensor but has detach())
            if not torch.isfinite(value):
                raise FloatingPointError(f"training loss became {value.item()} in epoch {epoch + 1}; "
                                         "lower the learning rate or check the input data")
            loss.backward()
            optimizer.step()
            size = int(batch["mask"].shape[0])
            total += float(value) * size
            count += size
        mean = total / max(count, 1)
        losses.append(mean)
        if on_epoch is not None:
            on_epoch(epoch, mean)
    return losses


@dataclass
class Predictions:
    """Model outputs on a split, kept on CPU as NumPy for metrics and plots."""

    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    risk: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    modality_weights: np.ndarray | None = None
    loss: float = float("nan")


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, loss_fn: LossFunction, device: torch.device) -> Predictions:
    model.to(device).eval()
    parts: dict[str, list[np.ndarray]] = {}
    total, count = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        outputs = model(batch)
        size = int(batch["mask"].shape[0])
        total += float(loss_fn(outputs, batch)) * size
        count += size
        if "logits" in outputs:
            parts.setdefault("probs", []).append(torch.softmax(outputs["logits"].float(), dim=1).cpu().numpy())
            parts.setdefault("labels", []).append(batch["label"].cpu().numpy())
        if "risk" in outputs:
            parts.setdefault("risk", []).append(outputs["risk"].float().cpu().numpy().reshape(-1))
            parts.setdefault("time", []).append(batch["time"].cpu().numpy())
            parts.setdefault("event", []).append(batch["event"].cpu().numpy())
        if "modality_weights" in outputs:
            parts.setdefault("modality_weights", []).append(outputs["modality_weights"].float().cpu().numpy())
    merged = {k: np.concatenate(v) for k, v in parts.items()}
    return Predictions(**merged, loss=total / max(count, 1))


def metrics_from(pred: Predictions) -> dict[str, float]:
    """All metrics the task allows, flat: ``auc``, ``balanced_accuracy``, ..., ``c_index``, ``loss``."""
    out: dict[str, float] = {"loss": pred.loss}
    if pred.probs is not None and pred.labels is not None:
        out.update(classification_report(pred.labels, pred.probs))
    if pred.risk is not None and pred.time is not None and pred.event is not None:
        out.update(survival_report(pred.time, pred.event, pred.risk))
    return out


def primary_metric(schema: Schema) -> str:
    """The metric early stopping and reports rank by: AUC for classification, else C-index."""
    return "auc" if schema.has_classification else "c_index"


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = float("nan")


#: An image backbone's parameters, one image or one per sequence (``encoders.image:t1.backbone.``).
_BACKBONE_NAME = re.compile(r"(_module\.)?encoders\.image(:[^.]+)?\.backbone\.")


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total`` (epochs or rounds).

    ``cosine`` decays from 1 to ``lr_min_factor`` over ``total`` steps; ``warmup_cosine`` first rises
    linearly over ``lr_warmup`` steps (1/W, 2/W, ..., 1) and then decays like ``cosine`` over the rest;
    ``step`` multiplies by ``lr_gamma`` every ``lr_step_size`` steps. Steps past ``total`` stay at
    the last value, so a resumed run with more rounds does not restart the schedule.
    """
    step = max(step, 0)
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** (step // cfg.lr_step_size)
    warmup = cfg.lr_warmup if cfg.lr_schedule == "warmup_cosine" else 0
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return cfg.lr_min_factor + (1.0 - cfg.lr_min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every parameter group's base lr (``initial_lr``, set by :func:`make_optimizer`).

    Works on Opacus' DPOptimizer too: it shares the wrapped optimizer's ``param_groups``.
    """
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


def make_optimizer(model: nn.Module, cfg: TrainConfig, *, step: int = 0, total: int | None = None
                   ) -> torch.optim.Optimizer:
    """The run's optimiser over the trainable parameters, at schedule position ``step`` of ``total``.

    Frozen parameters (``requires_grad=False``) are left out, so neither weight decay nor momentum
    moves them. The image backbone gets its own group at ``lr * backbone_lr_scale`` (fine-tuning
    pretrained weights more gently than the freshly initialised fusion and heads). ``total`` defaults
    to ``cfg.lr_horizon`` or, when that is 0, ``cfg.epochs``; a federated site passes its round.
    """
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if _BACKBONE_NAME.match(name) else rest).append(param)
    groups = [{"params": rest, "lr": cfg.lr, "initial_lr": cfg.lr}]
    if backbone:
        lr = cfg.lr * cfg.backbone_lr_scale
        groups.append({"params": backbone, "lr": lr, "initial_lr": lr})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("every parameter of the model is frozen; nothing to train")
    wd = cfg.weight_decay
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=wd)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=wd)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)
    elif cfg.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)
    else:  # TrainConfig validates the name; this guards hand-built configs
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
    horizon = total if total is not None else (cfg.lr_horizon or cfg.epochs)
    set_lr_factor(optimizer, lr_factor(cfg, step, horizon))
    return optimizer


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    cfg: TrainConfig,
    loss_fn: LossFunction,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train with early stopping on the validation split's primary metric; restore the best weights.

    Without a validation split the model trains all ``cfg.epochs`` and the last weights are kept.
    """
    device = pick_device(cfg.device)
    optimizer = make_optimizer(model, cfg)
    metric = primary_metric(loss_fn.schema)
    result = FitResult()
    best_state: dict[str, Tensor] | None = None
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    stale = 0
    for epoch in range(cfg.epochs):
        factor = lr_factor(cfg, epoch, cfg.lr_horizon or cfg.epochs)
        set_lr_factor(optimizer, factor)
        (train_loss,) = train_epochs(model, train_loader, optimizer, loss_fn, 1, device, start_epoch=epoch)
        row: dict[str, float] = {"epoch": epoch + 1, "train_loss": train_loss, "lr": cfg.lr * factor}
        if val_loader is not None:
            val = metrics_from(predict(model, val_loader, loss_fn, device))
            row.update({f"val_{k}": v for k, v in val.items()})
            # Rank by the metric, then by validation loss: on a small val split AUC saturates at 1.0
            # early, and without the tie-break the least-trained model would win.
            metric_value = val.get(metric, float("nan"))
            score = (-math.inf if math.isnan(metric_value) else round(metric_value, 4), -val["loss"])
            if best_state is None or score > best_key:
                best_key = score
                result.best_score, result.best_epoch = metric_value, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
                stale = 0
            else:
                stale += 1
        result.history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if val_loader is not None and stale >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = len(result.history)
    return result

