"""Accounting equals Opacus' accountants; calibrated noise ends at or under the budget; DP-SGD with
Poisson sampling, BatchMemoryManager, empty batches, ghost clipping and FedProx counts every step.

The model-level check (one real private step for every fusion and every registered backbone) is
``tests/unit/common/models/test_models_dp.py``; here a tiny dict-batch model keeps things fast.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from fedfusion.common.privacy import MAX_NOISE_MULTIPLIER, calibrate_noise, dp_schedule, epsilon_of, make_private
from fedfusion.common.privacy_policy import BudgetExceeded
from fedfusion.common.training import train_epochs

HISTORY = [(1.1, 0.05, 40), (1.1, 0.05, 40), (0.9, 0.1, 25)]

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning"),
]


def test_epsilon_equals_opacus_accountants() -> None:
    rdp = RDPAccountant()
    rdp.history = [(1.1, 0.05, 80), (0.9, 0.1, 25)]  # what Opacus' own step() makes of HISTORY
    assert epsilon_of(HISTORY, 1e-5, "rdp") == rdp.get_epsilon(delta=1e-5)
    prv = PRVAccountant()
    prv.history = list(HISTORY)
    assert epsilon_of(HISTORY, 1e-5, "prv") == pytest.approx(prv.get_epsilon(delta=1e-5), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gdp = GaussianAccountant()
    gdp.history = [(1.1, 0.05, 80)]
    assert epsilon_of([(1.1, 0.05, 80)], 1e-5, "gdp") == pytest.approx(gdp.get_epsilon(delta=1e-5), rel=1e-9)
    assert epsilon_of([], 1e-5) == 0.0 and math.isinf(epsilon_of([(0.0, 0.1, 1)], 1e-5))


@pytest.mark.parametrize("accountant", ["rdp", "gdp"])
def test_calibrated_noise_ends_at_or_under_the_remaining_budget(accountant: str) -> None:
    cap, delta, rate, steps = 10.0, 1e-5, 0.05, 200
    spent = epsilon_of(HISTORY, delta, accountant)
    sigma = calibrate_noise(HISTORY, rate, steps, cap, delta, accountant)
    assert spent < epsilon_of([*HISTORY, (sigma, rate, steps)], delta, accountant) <= cap
    # not wastefully noisy: 5% less noise would pass the budget
    assert epsilon_of([*HISTORY, (sigma * 0.95, rate, steps)], delta, accountant) > cap
    assert calibrate_noise(HISTORY, rate, steps, cap, delta, accountant, floor=5.0) == 5.0  # the site's minimum


def test_calibration_agrees_with_opacus_from_zero_and_refuses_a_spent_budget() -> None:
    sigma = calibrate_noise([], 0.01, 1000, 3.0, 1e-5)
    reference = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=1000)
    assert reference <= sigma <= reference * 1.05
    with pytest.raises(BudgetExceeded, match="the budget is spent"):
        calibrate_noise([(0.5, 1.0, 100)], 0.5, 10, 1.0, 1e-5)
    assert MAX_NOISE_MULTIPLIER >= 100


def test_dp_schedule_is_opacus_poisson_loader() -> None:
    assert dp_schedule(24, 8) == (1 / 3, 3)
    assert dp_schedule(10, 64) == (1.0, 1)


class _Toy(nn.Module):
    """A dict-batch model like FusionModel (batch keys ``x``, ``mask``, ``label``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(batch["x"])}


def _data(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "mask": torch.ones(1, dtype=torch.bool), "label": torch.tensor(i % 2)} for i in range(n)]


class _CrossEntropy:
    class_weights = None

    def __call__(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs["logits"], batch["label"])


@pytest.mark.parametrize(("mode", "physical"), [("hooks", 3), ("ghost", 0), ("functorch", 0), ("fused", 3)])
def test_private_epochs_count_every_logical_step(mode: str, physical: int) -> None:
    torch.manual_seed(0)
    model = _Toy()
    start = [p.detach().clone() for p in model.parameters()]
    private = make_private(
        model,
        _data(40),
        torch.optim.SGD(model.parameters(), lr=0.1),
        _CrossEntropy(),
        batch_size=10,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        physical_batch_size=physical,
        separable_loss=True,
        proximal_mu=0.1,
        secret_seed=3,
    )
    assert private.grad_sample_mode == mode and (private.sample_rate, private.steps_per_epoch) == (0.25, 4)
    batches = []
    train_epochs(
        private.module,
        private.loader,
        private.optimizer,
        private.loss_fn,
        2,
        torch.device("cpu"),
        amp=False,
        on_empty_batch=private.empty_step,
        on_epoch=lambda *_: batches.append(1),
    )
    private.close()
    assert private.steps_taken() == 8  # 2 epochs x 4 logical steps, however many physical batches
    assert private.accountant.history == [(1.0, 0.25, 8)]
    assert private.epsilon(1e-5) == epsilon_of([(1.0, 0.25, 8)], 1e-5)
    assert all(not torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start, strict=True))


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_empty_poisson_batch_still_takes_a_noisy_counted_step(mode: str) -> None:
    model = _Toy()
    private = make_private(
        model,
        _data(8),
        torch.optim.SGD(model.parameters(), lr=1.0),
        _CrossEntropy(),
        batch_size=4,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        secret_seed=1,
    )
    before = model.linear.weight.detach().clone()
    private.optimizer.zero_grad(set_to_none=True)
    private.empty_step()
    assert private.steps_taken() == 1
    assert not torch.equal(model.linear.weight.detach(), before)  # noise, not a silent skip


def test_ghost_clipping_falls_back_to_hooks_for_a_non_separable_loss() -> None:
    model = _Toy()
    with pytest.warns(UserWarning, match="ghost clipping needs a loss that is a sum of per-sample terms"):
        private = make_private(
            model,
            _data(8),
            torch.optim.SGD(model.parameters(), lr=0.1),
            _CrossEntropy(),
            batch_size=4,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="ghost",
            separable_loss=False,
        )
    assert private.grad_sample_mode == "hooks"


def test_noise_is_secret_unless_a_test_fixes_it() -> None:
    def noised_weights(seed: int | None) -> torch.Tensor:
        torch.manual_seed(0)  # the run's seed, which the coordinator knows
        model = _Toy()
        private = make_private(
            model,
            _data(8),
            torch.optim.SGD(model.parameters(), lr=1.0),
            _CrossEntropy(),
            batch_size=4,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            secret_seed=seed,
        )
        private.empty_step()
        return model.linear.weight.detach().clone()

    assert torch.equal(noised_weights(5), noised_weights(5))
    assert not torch.equal(noised_weights(None), noised_weights(None))


class _Wide(nn.Module):
    """Enough weights (20,000) for an empirical noise standard deviation within ~1 %."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 5000)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(batch["x"])[:, :2]}


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_is_opacus_floating_point_safe_noise_of_the_same_scale(mode: str) -> None:
    """Secure-mode noise (4 draws summed / 2) has the standard deviation of plain noise: σ·C / expected batch."""
    model = _Wide()
    private = make_private(model, _data(8), torch.optim.SGD(model.parameters(), lr=1.0), _CrossEntropy(),
                           batch_size=4, noise_multiplier=2.0, max_grad_norm=1.0, grad_sample_mode=mode,
                           separable_loss=True, secret_seed=3)
    assert private.optimizer.secure_mode is True
    before = model.linear.weight.detach().clone()
    private.optimizer.zero_grad(set_to_none=True)
    private.empty_step()
    moved = (model.linear.weight.detach() - before).flatten()
    assert moved.std().item() == pytest.approx(2.0 * 1.0 / 4, rel=0.03)
