"""A site's DP round: charged to the ledger before it trains, ε in the ledger equals Opacus' own
accountant, a crash mid-training still counts, a spent budget refuses without training."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import fedfusion.client.runtime as runtime
from fedfusion.client.ledger import PrivacyLedger
from fedfusion.client.runtime import RoundPrivacy, load_site, round_privacy, site_policy, study_name
from fedfusion.common.config import ModelConfig, Schema, TrainConfig
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.privacy_policy import BudgetExceeded, PrivacyError, PrivacyPolicy, PrivacyTerms

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")

TRAIN = TrainConfig(epochs=2, batch_size=8, device="cpu")


@pytest.fixture
def site_runtime(site: Path, schema: Schema, tmp_path: Path) -> Iterator[runtime.SiteRuntime]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and the cores are shared
    yield load_site(str(site), str(schema.save(tmp_path / "schema.json")), "A", "cpu")
    torch.set_num_threads(threads)


def _privacy(tmp_path: Path, cap: float = 4.0, noise: float | None = None, rounds_left: int = 3) -> RoundPrivacy:
    terms = PrivacyTerms(
        epsilon_cap=cap,
        delta=1e-5,
        max_grad_norm=1.0,
        min_noise_multiplier=0.5,
        noise_multiplier=noise,
        accountant="rdp",
    )
    return RoundPrivacy(terms, PrivacyLedger(tmp_path / "ledger.json"), "study-1", rounds_left, {"run": 7})


def test_dp_round_ledger_epsilon_equals_opacus_accountant(
    site_runtime: runtime.SiteRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = []
    real = runtime.make_private

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(runtime, "make_private", spy)
    privacy = _privacy(tmp_path)
    model = site_runtime.build_model(ModelConfig())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = site_runtime.train(model, TRAIN, server_round=1, privacy=privacy)

    (private,) = made
    assert private.steps_taken() == metrics["dp-steps"] == 2 * 3  # 24 training cases, batch 8: 3 steps an epoch
    assert privacy.ledger.history("study-1") == private.accountant.history
    assert metrics["epsilon"] == privacy.ledger.epsilon("study-1", 1e-5) == private.epsilon(1e-5)
    assert metrics["epsilon"] <= 4.0 and metrics["noise-multiplier"] >= 0.5
    assert (privacy.ledger.studies()["study-1"][0]["run"], privacy.ledger.studies()["study-1"][0]["site"]) == (7, "A")
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert not hasattr(next(model.parameters()), "grad_sample") or next(model.parameters()).grad_sample is None


def test_crash_during_training_is_already_counted(
    site_runtime: runtime.SiteRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*_args, **_kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runtime, "train_epochs", crash)
    privacy = _privacy(tmp_path)
    with pytest.raises(RuntimeError, match="out of memory"):
        site_runtime.train(site_runtime.build_model(ModelConfig()), TRAIN, 1, privacy=privacy)
    assert [steps for _, _, steps in privacy.ledger.history("study-1")] == [6]  # over-counted, never under


def test_spent_budget_refuses_before_training(
    site_runtime: runtime.SiteRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = []
    monkeypatch.setattr(runtime, "train_epochs", lambda *a, **k: trained.append(1) or [0.0])
    privacy = _privacy(tmp_path, cap=1.0, noise=0.6)
    with pytest.raises(BudgetExceeded, match="study 'study-1'"):
        site_runtime.train(site_runtime.build_model(ModelConfig()), TRAIN, 1, privacy=privacy)
    assert trained == [] and privacy.ledger.history("study-1") == []


def test_policy_and_terms_come_from_node_or_run_config(
    site_runtime: runtime.SiteRuntime, site: Path, tmp_path: Path
) -> None:
    node = {"manifest": str(site), "privacy-max-epsilon": "2.0", "privacy-delta": "1e-06"}
    policy = site_policy(node, {}, "A")
    assert policy.required and policy.max_epsilon == 2.0 and policy.ledger == str(site.parent / "privacy-ledger.json")
    simulated = site_policy({"partition-id": 0}, {"data-dir": str(tmp_path)}, "A")
    assert not simulated.required and simulated.ledger == str(tmp_path.resolve() / "privacy-ledger-A.json")

    cfg = FederationConfig.from_run_config({"dp-mode": "sample", "num-server-rounds": 5})
    assert study_name(cfg, site_runtime.schema) == "schema:toy"
    privacy = round_privacy(site_runtime, policy, cfg, server_round=2)
    assert privacy is not None and privacy.rounds_left == 4 and privacy.terms.epsilon_cap == 2.0
    assert round_privacy(site_runtime, PrivacyPolicy(), FederationConfig.from_run_config({}), 1) is None
    with pytest.raises(PrivacyError, match="^dp-mode"):
        round_privacy(site_runtime, policy, FederationConfig.from_run_config({}), 1)


def test_a_nearly_spent_budget_trains_with_far_more_noise_and_says_so(
    site_runtime: runtime.SiteRuntime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fresh = RoundPrivacy(_privacy(tmp_path / "fresh").terms, PrivacyLedger(tmp_path / "fresh.json"), "study-1", 3,
                         run_rounds=3)
    caplog.set_level("INFO", logger="fedfusion.client.runtime")
    healthy = site_runtime.train(site_runtime.build_model(ModelConfig()), TRAIN, server_round=1, privacy=fresh)
    # an unspent budget trains with the σ the run's plan asks for
    assert healthy["noise-multiplier"] == pytest.approx(healthy["noise-multiplier-asked"], rel=0.02)
    assert "mostly noise" not in caplog.text

    spent = RoundPrivacy(fresh.terms, PrivacyLedger(tmp_path / "spent.json"), "study-1", 3, run_rounds=3)
    spent.ledger.record("study-1", 2.55, 0.3, 40)  # an earlier run of the same study spent ε 3.84 of 4
    assert 3.8 < spent.epsilon() < 3.9
    caplog.clear()
    noisy = site_runtime.train(site_runtime.build_model(ModelConfig()), TRAIN, server_round=1, privacy=spent)
    assert noisy["noise-multiplier-asked"] == pytest.approx(healthy["noise-multiplier-asked"], rel=0.02)
    assert noisy["noise-multiplier"] > 2 * noisy["noise-multiplier-asked"]
    assert noisy["epsilon"] <= 4.0
    assert f"site A, round 1: training with noise multiplier σ {noisy['noise-multiplier']:.3g}" in caplog.text
    assert "this update is mostly noise" in caplog.text
