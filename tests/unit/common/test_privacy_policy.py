"""A site's privacy policy is a floor the coordinator can only raise: weaker requests are refused
with the run-config key named, stronger ones tighten the round's terms."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.privacy_policy import (
    PrivacyError,
    PrivacyPolicy,
    PrivacyRequest,
    negotiate,
    simulated_site_policy,
)

POLICY = PrivacyPolicy(max_epsilon=3.0, delta=1e-5, max_grad_norm=1.0, min_noise_multiplier=0.8, required=True)


@pytest.mark.parametrize(
    ("request_kwargs", "setting"),
    [
        ({"mode": "off"}, "dp-mode"),
        ({"mode": "client"}, "dp-mode"),
        ({"mode": "sample", "target_epsilon": 3.5}, "target-epsilon"),
        ({"mode": "sample", "target_delta": 1e-4}, "target-delta"),
        ({"mode": "sample", "max_grad_norm": 2.0}, "dp-max-grad-norm"),
        ({"mode": "sample", "noise_multiplier": 0.5}, "dp-noise-multiplier"),
    ],
)
def test_weaker_request_is_refused_naming_the_setting(request_kwargs: dict, setting: str) -> None:
    with pytest.raises(PrivacyError) as refused:
        negotiate(POLICY, PrivacyRequest(**request_kwargs))
    assert str(refused.value).startswith(f"{setting}:")
    assert "site.toml [privacy]" in str(refused.value)


def test_stronger_request_tightens_the_terms() -> None:
    request = PrivacyRequest(
        mode="sample", target_epsilon=1.0, target_delta=1e-6, max_grad_norm=0.5, noise_multiplier=1.2
    )
    terms = negotiate(POLICY, request)
    assert terms is not None
    assert (terms.epsilon_cap, terms.delta, terms.max_grad_norm, terms.noise_multiplier) == (1.0, 1e-6, 0.5, 1.2)
    defaults = negotiate(POLICY, PrivacyRequest(mode="sample"))
    assert defaults is not None
    assert (defaults.epsilon_cap, defaults.delta, defaults.max_grad_norm, defaults.noise_multiplier) == (
        3.0,
        1e-5,
        1.0,
        None,
    )
    assert defaults.min_noise_multiplier == 0.8


def test_site_without_policy_follows_the_run_but_needs_a_finite_budget() -> None:
    open_site = PrivacyPolicy()
    assert negotiate(open_site, PrivacyRequest(mode="off")) is None
    assert negotiate(open_site, PrivacyRequest(mode="client")) is None
    terms = negotiate(open_site, PrivacyRequest(mode="sample", target_epsilon=8.0, max_grad_norm=5.0))
    assert terms is not None and (terms.epsilon_cap, terms.max_grad_norm) == (8.0, 5.0)
    with pytest.raises(PrivacyError, match="^target-epsilon: this site has no privacy policy"):
        negotiate(open_site, PrivacyRequest(mode="sample"))


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"max-epsilon": 3.0, "max-eps": 1}, "unknown [privacy] keys ['max-eps']"),
        ({"delta": 1e-5}, "needs max-epsilon"),
        ({"max-epsilon": 3.0, "delta": 2.0}, "delta must be in (0, 1)"),
        ({"max-epsilon": -1.0}, "max-epsilon must be > 0"),
        ({"max-epsilon": 3.0, "accountant": "moments"}, "accountant must be one of"),
        ({"max-epsilon": "three"}, "must be a number"),
    ],
)
def test_bad_policy_table_is_named(table: dict, needle: str) -> None:
    with pytest.raises(PrivacyError) as caught:
        PrivacyPolicy.from_table(table, "site.toml")
    assert needle in str(caught.value) and "site.toml" in str(caught.value)


def test_policy_survives_the_node_config(tmp_path: Path) -> None:
    policy = PrivacyPolicy.from_table(
        {"max-epsilon": 2.5, "delta": 1e-6, "accountant": "prv", "ledger": "l.json", "max-epsilon-all-studies": 6.0},
        "site.toml",
        base_dir=tmp_path,
    )
    assert policy.ledger == str(tmp_path / "l.json")
    # what `flower-supernode --node-config` hands the ClientApp: strings, parsed back to the same policy
    back = PrivacyPolicy.from_node_config(policy.node_config())
    assert back == policy
    open_site = PrivacyPolicy(ledger="/x/ledger.json")
    assert open_site.node_config() == {"privacy-ledger": "/x/ledger.json"}
    assert PrivacyPolicy.from_node_config({}, default_ledger="/d/l.json") == PrivacyPolicy(ledger="/d/l.json")


def test_simulated_sites_share_defaults_and_override_per_site(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[privacy]\nmax-epsilon = 4.0\n[privacy.sites.A]\nmax-epsilon = 0.5\nmin-noise-multiplier = 1.0\n")
    a, b = simulated_site_policy(path, "A"), simulated_site_policy(path, "B")
    assert (a.max_epsilon, a.min_noise_multiplier, b.max_epsilon) == (0.5, 1.0, 4.0)
    assert a.required and a.ledger == str(tmp_path / "privacy-ledger-A.json")
    only_a = tmp_path / "only-a.toml"
    only_a.write_text("[privacy.sites.A]\nmax-epsilon = 1.0\n")
    assert not simulated_site_policy(only_a, "B").required
    with pytest.raises(PrivacyError, match="sim-privacy-policy: file not found"):
        simulated_site_policy(tmp_path / "missing.toml", "A")


def test_run_config_parses_the_request() -> None:
    cfg = FederationConfig.from_run_config({"dp-mode": "sample", "target-epsilon": 2, "study": "brca-2026"})
    assert cfg.privacy.mode == "sample" and cfg.privacy.target_epsilon == 2.0 and cfg.study == "brca-2026"
    assert FederationConfig.from_run_config({}).privacy == PrivacyRequest()
    with pytest.raises(ValueError, match="dp-mode must be one of"):
        FederationConfig.from_run_config({"dp-mode": "maybe"})
    assert math.isinf(PrivacyPolicy().max_epsilon)
