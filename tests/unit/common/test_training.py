"""Losses and loops: the Cox loss matches a reference fit; training actually learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfusion.common.config import ClinicalColumn, Schema
from fedfusion.common.training import (
    LossFunction,
    class_weights_for,
    cox_partial_likelihood,
    pick_device,
    seed_everything,
)


def _breslow_nll_reference(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Straight-from-the-formula Breslow negative log partial likelihood, mean over events."""
    total = 0.0
    for i in np.flatnonzero(event):
        at_risk = time >= time[i]
        total -= risk[i] - np.log(np.exp(risk[at_risk]).sum())
    return total / max(event.sum(), 1)


def test_cox_loss_matches_formula_with_ties() -> None:
    rng = np.random.default_rng(0)
    time = rng.integers(1, 8, size=30).astype(float)  # many tied times
    event = (rng.uniform(size=30) < 0.7).astype(float)
    risk = rng.normal(size=30)
    ours = cox_partial_likelihood(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    assert float(ours) == pytest.approx(_breslow_nll_reference(risk, time, event), rel=1e-5)


def test_cox_loss_without_events_is_zero_and_differentiable() -> None:
    risk = torch.randn(5, requires_grad=True)
    loss = cox_partial_likelihood(risk, torch.arange(1.0, 6.0), torch.zeros(5))
    loss.backward()
    assert float(loss) == 0.0 and risk.grad is not None


def test_linear_cox_fit_matches_scikit_survival() -> None:
    """Full-batch gradient descent on our loss recovers sksurv's Breslow Cox coefficients."""
    sksurv_linear = pytest.importorskip("sksurv.linear_model")
    from lifelines.datasets import load_rossi

    data = load_rossi().iloc[:200]
    x = data[["fin", "age", "prio"]].to_numpy(float)
    x = (x - x.mean(0)) / x.std(0)
    time, event = data["week"].to_numpy(float), data["arrest"].to_numpy(bool)
    y = np.array(list(zip(event, time, strict=True)), dtype=[("e", bool), ("t", float)])
    reference = sksurv_linear.CoxPHSurvivalAnalysis(ties="breslow").fit(x, y).coef_

    beta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([beta], lr=1, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12)
    xt, tt, et = torch.tensor(x), torch.tensor(time), torch.tensor(event.astype(float))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = cox_partial_likelihood(xt @ beta, tt, et)
        loss.backward()
        return loss

    optimizer.step(closure)
    # our loss is float32 inside; agree to ~1e-3
    np.testing.assert_allclose(beta.detach().numpy(), reference, atol=2e-3)


def test_class_weights_balance_minority() -> None:
    weights = class_weights_for(np.array([0] * 90 + [1] * 10), 2)
    assert weights[1] / weights[0] == pytest.approx(9.0)
    assert class_weights_for(np.array([0, 0]), 2)[1] == 1.0  # absent class: neutral weight


def test_loss_function_sums_both_tasks() -> None:
    schema = Schema(name="s", task="both", classes=("a", "b"), clinical=(ClinicalColumn("x"),))
    outputs = {"logits": torch.tensor([[2.0, 0.0], [0.0, 2.0]]), "risk": torch.tensor([0.5, -0.5])}
    batch = {"label": torch.tensor([0, 1]), "time": torch.tensor([1.0, 2.0]), "event": torch.tensor([1.0, 0.0])}
    ce = torch.nn.functional.cross_entropy(outputs["logits"], batch["label"])
    cox = cox_partial_likelihood(outputs["risk"], batch["time"], batch["event"])
    assert float(LossFunction(schema)(outputs, batch)) == pytest.approx(float(ce + cox))


def test_device_pick_and_seeding() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("cuda", [False, True])
def test_loaders_pin_memory_exactly_when_a_gpu_is_present(cuda: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinned batches make the non_blocking host-to-GPU copies asynchronous; on a CPU-only host pinning
    would only cost page-locked memory."""
    from fedfusion.common.training import make_loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert make_loader(list(range(8)), 4, shuffle=False).pin_memory is cuda


def test_training_keeps_freed_memory_for_the_next_step_on_glibc() -> None:
    """The allocator tuning train_epochs applies (freed step memory reused, not returned to the OS and
    page-faulted back) succeeds on glibc, and is applied once per process."""
    import platform

    from fedfusion.common import training

    first = training.keep_freed_memory_for_reuse()
    assert training.keep_freed_memory_for_reuse() is first  # once per process
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True
