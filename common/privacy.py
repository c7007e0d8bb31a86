"""Sample-level differential privacy: accounting and DP-SGD with Opacus (DESIGN.md §6).

- **Accounting.** :func:`epsilon_of` turns an accountant history (``(noise multiplier, sample rate,
  steps)`` entries, Opacus' own format) into ε at δ with the RDP, PRV or GDP accountant;
  :func:`calibrate_noise` finds the smallest noise multiplier with which a planned number of further
  steps keeps a history at or under a budget. The site's ledger (``client/ledger.py``) is the only
  caller that keeps state; nothing else computes ε.
- **DP-SGD.** :func:`make_private` wraps model, optimizer and a Poisson-sampled loader with Opacus'
  ``PrivacyEngine`` (hooks, ghost clipping or functorch per-sample gradients, or the fused clipping of
  ``common/dp_fused.py`` around Opacus' optimizer and accountant; ``BatchMemoryManager``
  when a logical batch exceeds the physical maximum), with noise and sampling drawn from the
  operating system's randomness: a coordinator that knows the run's seed must not be able to
  regenerate, and subtract, the noise, nor know which cases were in which batch.

What a site allows and a run asks for (policy, request, terms) is ``common/privacy_policy.py``.

Privacy holds per *sample* only for losses that are sums of per-sample terms (cross-entropy). The
Cox partial likelihood compares each case with the others in its batch (its risk set), so one
patient's record also changes the other cases' gradients; clipping bounds each case's own gradient
but the textbook DP-SGD guarantee assumes more. ε for survival tasks is therefore the DP-SGD
accounting of the clipped, noised mechanism, not a proven bound; reports should say so.

Opacus and torch are imported inside functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fedfusion.common.privacy_policy import ACCOUNTANTS, BudgetExceeded, PrivacyError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

#: Beyond this noise multiplier an update is essentially noise; a site refuses instead of training.
MAX_NOISE_MULTIPLIER = 1_000.0

History = Sequence[tuple[float, float, int]]


# ---------------------------------------------------------------------------------------- accounting


def dp_schedule(num_examples: int, batch_size: int) -> tuple[float, int]:
    """(sample rate, steps per epoch) of Opacus' Poisson loader for ``num_examples`` cases.

    Opacus derives both from the plain loader: ``ceil(n / batch)`` batches, each case included in
    a step with probability ``1 / batches``; the ledger must count exactly what Opacus runs.
    """
    if num_examples < 1:
        raise PrivacyError("this site has no training cases; DP-SGD needs at least one")
    steps = math.ceil(num_examples / batch_size)
    return 1.0 / steps, steps


_INTEGER_ORDERS = (*range(2, 11), *range(12, 64))  # Opacus' default orders without the fractional ones


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float, integer_orders: bool = False) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    orders = _INTEGER_ORDERS if integer_orders else RDPAccountant.DEFAULT_ALPHAS
    return tuple(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float, integer_orders: bool = False) -> float:
    import numpy as np
    from opacus.accountants.analysis.rdp import get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    orders = _INTEGER_ORDERS if integer_orders else RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(np.asarray(_rdp_per_step(s, q, integer_orders)) * n for s, q, n in history)
    with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": expected while searching
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def _merge(history: History) -> list[tuple[float, float, int]]:
    """Adjacent entries with the same (σ, q) as one (what Opacus' RDP accountant does step by step)."""
    merged: list[tuple[float, float, int]] = []
    for sigma, rate, steps in history:
        if steps <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == rate:
            merged[-1] = (sigma, rate, merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(rate), int(steps)))
    return merged


def epsilon_of(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` of a history of ``(noise multiplier, sample rate, steps)`` entries.

    ``rdp`` equals Opacus' ``RDPAccountant`` bit for bit (same orders, same sum) and is cached per
    (σ, q), so calibration and the ledger stay fast; ``prv`` is Opacus' PRV accountant (tighter, an
    upper estimate within 0.01); ``gdp`` composes μ-GDP (exact for one (σ, q), as Opacus does), a
    central-limit approximation that can underestimate ε: prefer rdp or prv for a budget.
    """
    history = _merge(history)
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = list(history)
        return float(prv.get_epsilon(delta=delta))
    if accountant == "gdp":
        from opacus.accountants.analysis.gdp import delta_eps_mu, eps_from_mu

        try:
            mu = math.sqrt(sum(q * q * n * math.expm1(s**-2) for s, q, n in history))
        except OverflowError:
            return math.inf
        if not math.isfinite(mu) or delta_eps_mu(eps=500.0, mu=mu) > delta:
            return math.inf  # beyond the range Opacus solves in: no meaningful privacy
        if mu == 0 or delta_eps_mu(eps=0.0, mu=mu) <= delta:
            return 0.0
        return float(eps_from_mu(mu=mu, delta=delta))
    raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def calibrate_noise(
    history: History,
    sample_rate: float,
    steps: int,
    epsilon_cap: float,
    delta: float,
    accountant: str = "rdp",
    floor: float = 0.0,
    tolerance: float = 0.01,
) -> float:
    """A noise multiplier at or above ``floor`` with which ``steps`` more steps at ``sample_rate``
    keep ``history`` at or under ``epsilon_cap`` (the smallest such, to ``tolerance`` relative).

    Bisection over the accountant itself, with the ledger's whole history, so a study that already
    spent part of its budget gets the noise its *remaining* budget needs (Opacus'
    ``get_noise_multiplier`` only plans from zero). With ``rdp`` the search uses Opacus' integer
    orders only: an upper bound on ε (a minimum over fewer orders), ~50x faster for large sample
    rates, so the σ found is at most a little conservative. The result is always verified with the
    exact accountant. Raises :class:`BudgetExceeded` when even :data:`MAX_NOISE_MULTIPLIER` does not
    fit: the budget is spent.
    """
    merged = _merge(history)

    def exact(sigma: float) -> bool:
        return epsilon_of([*merged, (sigma, sample_rate, steps)], delta, accountant) <= epsilon_cap

    def search(sigma: float) -> bool:
        if accountant == "rdp":
            bound = _rdp_epsilon(_merge([*merged, (sigma, sample_rate, steps)]), delta, integer_orders=True)
            return bound <= epsilon_cap
        return exact(sigma)

    if floor > 0 and exact(floor):
        return floor
    low, high = floor, max(floor, 0.25)
    while not (search(high) and exact(high)):
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            spent = epsilon_of(merged, delta, accountant)
            raise BudgetExceeded(
                f"the budget is spent: ε = {spent:.4g} of {epsilon_cap:g} (δ = {delta:g}); even a "
                f"noise multiplier of {MAX_NOISE_MULTIPLIER:g} would pass it in {steps} more steps"
            )
    while high - low > tolerance * high:
        middle = (low + high) / 2
        if search(middle):
            high = middle
        else:
            low = middle
    while not exact(high):  # cannot happen (the search bound is an upper bound); kept as the guarantee
        high *= 1 + tolerance
    return high


# ----------------------------------------------------------------------------------------- DP-SGD


@dataclass
class PrivateTraining:
    """Opacus' private model, optimizer and loader for one round, plus what the ledger must check.

    Use ``module``/``optimizer``/``loader``/``loss_fn`` exactly like their plain counterparts (see
    ``common.training.train_epochs``), pass :meth:`empty_step` as its ``on_empty_batch`` and call
    :meth:`close` afterwards (it removes Opacus' hooks from the model).
    """

    module: nn.Module
    optimizer: Any  # opacus DPOptimizer
    loader: DataLoader
    loss_fn: Callable[..., Any]
    accountant: Any  # opacus IAccountant, advanced by the optimizer
    sample_rate: float
    steps_per_epoch: int
    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str

    def steps_taken(self) -> int:
        """Noisy steps the optimizer actually made (what Opacus' accountant counted)."""
        return int(sum(n for _, _, n in self.accountant.history))

    def epsilon(self, delta: float) -> float:
        """Opacus' own ε for this round's steps (a cross-check of the ledger)."""
        return float(self.accountant.get_epsilon(delta=delta))

    def empty_step(self) -> None:
        """A noise-only step for an empty Poisson batch.

        Skipping it would leave the model untouched exactly when no case was sampled, which tells an
        observer something about the data; DP-SGD's guarantee assumes every step adds noise.
        """
        import torch

        for p in self.optimizer.params:
            if self.grad_sample_mode in ("ghost", "fused"):  # these optimizers read p.grad (already clipped)
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        self.optimizer.step()

    def close(self) -> None:
        close = getattr(self.module, "_close", None)
        if close is not None:
            close()


class _PerSampleCrossEntropy:
    """Cross-entropy with a ``reduction`` attribute, the criterion form Opacus' ghost clipping drives."""

    def __init__(self, class_weights: torch.Tensor | None) -> None:
        self.class_weights = class_weights
        self.reduction = "mean"

    def __call__(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        logits = outputs["logits"].float()
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        losses = F.cross_entropy(logits, batch["label"], weight=weight, reduction="none")
        return losses if self.reduction == "none" else (losses.mean() if self.reduction == "mean" else losses.sum())


def _secret_generator(device: torch.device, seed: int | None) -> torch.Generator:
    import torch

    secret = int.from_bytes(os.urandom(8), "little") if seed is None else seed
    return torch.Generator(device=device).manual_seed(secret)


def make_private(
    model: nn.Module,
    dataset: Dataset,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., Any],
    *,
    batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: str = "rdp",
    grad_sample_mode: str = "hooks",
    physical_batch_size: int = 0,
    device: torch.device | str = "cpu",
    proximal_mu: float = 0.0,
    separable_loss: bool = False,
    num_workers: int = 0,
    secret_seed: int | None = None,
) -> PrivateTraining:
    """Wrap ``model``/``optimizer`` with Opacus' ``PrivacyEngine`` over a Poisson-sampled loader.

    ``batch_size`` is the expected logical batch; ``physical_batch_size`` > 0 caps what goes through
    the model at once (``BatchMemoryManager``; privacy and result unchanged, memory bounded).
    ``grad_sample_mode="ghost"`` (ghost clipping: per-sample norms without per-sample gradients) is
    used only when ``separable_loss`` (the loss is a sum of per-sample terms, i.e. classification
    only) and Opacus accepts the model; otherwise hooks mode, with a warning.
    ``grad_sample_mode="fused"`` (``common/dp_fused.py``): the same clipped sum as hooks mode from one
    backward without per-sample gradients of Linear layers (~1.3x a plain step on the default model
    instead of ~1.9x); any loss, as hooks. A model with other trainable layer types is refused, and so is
    one whose probe-batch gradient the fused sums do not reproduce. ``"auto"`` is fused where it
    applies and hooks elsewhere.
    ``proximal_mu`` > 0 adds FedProx's data-independent pull towards the starting weights after the
    noise (Opacus replaces ``p.grad`` with the noised per-sample sum, which would drop a term added
    to the loss). ``secret_seed`` is for tests only: by default noise and sampling come from
    ``os.urandom``.
    """
    import torch
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import wrap_data_loader
    from torch.utils.data import DataLoader

    device = torch.device(device)
    model.to(device)
    sample_rate, steps = dp_schedule(len(dataset), batch_size)  # type: ignore[arg-type]
    mode = grad_sample_mode
    if mode in ("fused", "auto"):
        mode = _fused_or_hooks(model, mode)
    if mode == "ghost" and not separable_loss:
        warnings.warn(
            "ghost clipping needs a loss that is a sum of per-sample terms (classification only); "
            "using Opacus' hooks mode",
            stacklevel=2,
        )
        mode = "hooks"
    sampling = _secret_generator(torch.device("cpu"), None if secret_seed is None else secret_seed + 1)
    plain = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=sampling, num_workers=num_workers)
    kwargs: dict[str, Any] = dict(
        module=model,
        optimizer=optimizer,
        data_loader=plain,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=_secret_generator(device, secret_seed),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*GDP accounting is experimental.*")
        engine = PrivacyEngine(accountant=accountant)
        if mode == "ghost":
            criterion = _PerSampleCrossEntropy(getattr(loss_fn, "class_weights", None))
            module = None
            try:
                module, dp_optimizer, dp_loss, loader = engine.make_private(
                    **kwargs, criterion=criterion, grad_sample_mode="ghost"
                )
                _probe(module, dp_optimizer, dp_loss, dataset, device)
            except (NotImplementedError, ValueError, RuntimeError) as err:
                warnings.warn(f"ghost clipping is not supported for this model ({err}); using hooks mode", stacklevel=2)
                if module is not None:
                    module._close()
                engine = PrivacyEngine(accountant=accountant)
                mode = "hooks"
        if mode == "fused":
            module, dp_optimizer, dp_loss, loader = _make_fused(engine, kwargs, loss_fn)
            try:
                _probe_fused(module, loss_fn, dataset, device)
            except (PrivacyError, RuntimeError, ValueError, NotImplementedError) as err:
                module._close()
                if grad_sample_mode == "fused":
                    raise
                warnings.warn(f"fused clipping is not usable for this model ({err}); using hooks mode", stacklevel=2)
                engine = PrivacyEngine(accountant=accountant)
                mode = "hooks"
        if mode not in ("ghost", "fused"):
            module, dp_optimizer, loader = engine.make_private(**kwargs, grad_sample_mode=mode)
            dp_loss = loss_fn
    # Opacus' floating-point-safe noise (4 Gaussian draws summed / 2, arXiv 2107.10138): the same N(0, σ²C²),
    # but its low bits no longer reveal the unnoised value; no measurable cost on the default model
    # (benchmarks/dp_secure_noise.py). PrivacyEngine(secure_mode=True) would also need torchcsprng, which has no
    # build for our torch; the generator stays the os.urandom-seeded one above.
    dp_optimizer.secure_mode = True
    if physical_batch_size and physical_batch_size < batch_size:
        loader = wrap_data_loader(data_loader=loader, max_batch_size=physical_batch_size, optimizer=dp_optimizer)
    if proximal_mu > 0:
        _attach_proximal(dp_optimizer, proximal_mu)
    return PrivateTraining(
        module=module,
        optimizer=dp_optimizer,
        loader=loader,
        loss_fn=dp_loss,
        accountant=engine.accountant,
        sample_rate=sample_rate,
        steps_per_epoch=steps,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        grad_sample_mode=mode,
    )


def _fused_or_hooks(model: nn.Module, mode: str) -> str:
    """``auto``: fused when every trainable layer is one it supports, else Opacus' hooks (no warning: both are
    exact DP-SGD). ``fused`` stays fused; an unsupported model is then refused with the layers named."""
    from fedfusion.common.dp_fused import unsupported_layers

    return "fused" if mode == "fused" or not unsupported_layers(model) else "hooks"


def _make_fused(engine: Any, kwargs: dict[str, Any], loss_fn: Callable[..., Any]) -> tuple[Any, Any, Any, Any]:
    """Opacus' pieces around the fused clipping (``common/dp_fused.py``), assembled as ``make_private`` does.

    The same validator (no BatchNorm), Poisson loader, expected batch size and accountant hook as
    ``PrivacyEngine.make_private``; the optimizer is Opacus' ``DPOptimizerFastGradientClipping``, which
    noises ``p.grad`` (the clipped per-sample sum the fused backward wrote) instead of clipping again.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from fedfusion.common.dp_fused import FusedClippingModule

    model = kwargs["module"]
    engine.validate(module=model, optimizer=None, data_loader=None)
    loader = DPDataLoader.from_data_loader(kwargs["data_loader"], distributed=False)
    sample_rate = 1 / len(loader)
    optimizer = DPOptimizerFastGradientClipping(
        kwargs["optimizer"],
        noise_multiplier=kwargs["noise_multiplier"],
        max_grad_norm=kwargs["max_grad_norm"],
        expected_batch_size=int(len(loader.dataset) * sample_rate),
        loss_reduction="mean",
        generator=kwargs["noise_generator"],
    )
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    module = FusedClippingModule(model, kwargs["max_grad_norm"], loss_reduction="mean")
    return module, optimizer, module.loss(loss_fn), loader


def _probe_fused(module: Any, loss_fn: Callable[..., Any], dataset: Dataset, device: torch.device) -> None:
    """The fused sums must equal autograd's gradient on two cases (``dp_fused.verify``); no step, no privacy spent."""
    from torch.utils.data import DataLoader

    from fedfusion.common.dp_fused import verify

    batch = next(iter(DataLoader(dataset, batch_size=min(2, len(dataset)))))  # type: ignore[arg-type]
    verify(module, {k: v.to(device) for k, v in batch.items()}, loss_fn)


def _probe(
    module: nn.Module, optimizer: Any, loss_fn: Callable[..., Any], dataset: Dataset, device: torch.device
) -> None:
    """One forward and backward on two cases, no step: Opacus' ghost clipping accepts some models at
    wrap time and fails at the first backward; better to find out before the round is trained.
    Nothing is released (no optimizer step), so the probe costs no privacy."""
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(dataset, batch_size=min(2, len(dataset)))))  # type: ignore[arg-type]
    batch = {k: v.to(device) for k, v in batch.items()}
    loss_fn(module(batch), batch).backward()
    optimizer.zero_grad(set_to_none=True)


def _attach_proximal(optimizer: Any, mu: float) -> None:
    """Add ``mu * (w - w_start)`` to each noised gradient, after the accountant's step hook."""
    params = list(optimizer.params)
    anchor = [p.detach().clone() for p in params]
    accountant_hook = optimizer.step_hook

    def hook(opt: Any) -> None:
        if accountant_hook is not None:
            accountant_hook(opt)
        for p, a in zip(params, anchor, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - a, alpha=mu)

    optimizer.step_hook = hook
