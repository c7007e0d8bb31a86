"""A freshly provisioned kit is safe before anyone edits it: parsed by the real SiteConfig loader, it
refuses unknown app bundles, requires secure aggregation, caps ε per study and over all studies, and
trusts the roster that lists every site of the federation."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.common.config import parse_config_args

from fedfusion.client.approval import AppNotApproved, check_approved, install_verified
from fedfusion.client.daemon import SiteConfig, warm_superexec_command
from fedfusion.common.privacy_policy import PrivacyError, PrivacyRequest, negotiate
from fedfusion.common.roster import Roster
from fedfusion.server.provision import provision

SITES = ["st-marys", "charite", "ucl"]
APPROVED = "ab" * 32


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("kits")
    refusing = provision(root / "refusing", ",".join(SITES), ["coord.example.org"]).root
    approving = provision(root / "approving", SITES, ["coord.example.org"], approved_apps=[APPROVED]).root
    return refusing, approving


def test_approval_refuses_every_bundle_until_a_hash_is_set(kits: tuple[Path, Path], tmp_path: Path) -> None:
    refusing, approving = kits
    empty = SiteConfig.load(refusing / "ucl" / "site.toml")
    assert empty.approved_apps == frozenset()  # an empty list: refuse all, never "no approval table"
    with pytest.raises(AppNotApproved):
        check_approved(APPROVED, empty.approved_apps)
    cmd = warm_superexec_command(empty, supernode_pid=1)  # the process that enforces approval at the site
    assert cmd[cmd.index("--approved-apps") + 1] == ""  # an empty allow-list (approve none), not "no allow-list"
    with pytest.raises(AppNotApproved):  # a bundle's bytes are refused before anything is unpacked
        install_verified(b"PK\x05\x06" + bytes(18), empty.approved_apps, tmp_path / "installed")
    assert not (tmp_path / "installed").exists()
    given = SiteConfig.load(approving / "ucl" / "site.toml")
    assert given.approved_apps == frozenset({APPROVED})
    check_approved(APPROVED, given.approved_apps)
    with pytest.raises(AppNotApproved):
        check_approved("cd" * 32, given.approved_apps)


@pytest.mark.parametrize("site", SITES)
def test_secure_aggregation_and_dp_budgets_are_in_force(kits: tuple[Path, Path], site: str) -> None:
    cfg = SiteConfig.load(kits[0] / site / "site.toml")
    assert cfg.require_secure_aggregation
    assert parse_config_args([cfg.node_config()])["require-secure-aggregation"] == "true"  # what the ClientApp reads
    policy = cfg.privacy
    assert policy.required and (policy.max_epsilon, policy.max_epsilon_all_studies) == (3.0, 3.0)
    assert (policy.delta, policy.max_grad_norm) == (1e-5, 1.0)
    with pytest.raises(PrivacyError, match="requires sample-level DP-SGD"):
        negotiate(policy, PrivacyRequest(mode="off"))
    with pytest.raises(PrivacyError, match="target-epsilon"):
        negotiate(policy, PrivacyRequest(mode="sample", target_epsilon=5.0))
    with pytest.raises(PrivacyError, match="dp-max-grad-norm"):
        negotiate(policy, PrivacyRequest(mode="sample", max_grad_norm=2.0))
    terms = negotiate(policy, PrivacyRequest(mode="sample"))
    assert terms is not None and terms.epsilon_cap_all_studies == 3.0


def test_every_kit_holds_the_same_roster_naming_each_sites_own_key(kits: tuple[Path, Path]) -> None:
    root = kits[0]
    coordinator = Roster.load(root / "coordinator" / "roster.json")
    assert sorted(coordinator.keys) == sorted(SITES)
    for site in SITES:
        roster = Roster.load(root / site / "roster.json")
        assert roster.fingerprint == coordinator.fingerprint
        key = serialization.load_ssh_private_key((root / site / "site.key").read_bytes(), None)
        assert roster.site_of(key.public_key()) == site  # type: ignore[arg-type]
        assert 'roster = "roster.json"' in (root / site / "site.toml").read_text()
