"""Signed SecAgg+ (common/secagg/signing.py): the site policy's bounds, advertisement and survivor-set
signatures against a real roster, and the in-process signed round equal to the unsigned one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedfusion.common.roster import Roster, load_signing_key
from fedfusion.common.secagg import ProtocolViolation, SecAggConfig, VectorLayout, run_round
from fedfusion.common.secagg.messages import AdvertisedKeys, UnmaskRequest
from fedfusion.common.secagg.signing import (
    SitePolicy,
    advertisement_signature,
    check_round,
    required_signers,
    survivors_signature,
    verify_advertisements,
    verify_survivor_signatures,
)
from fedfusion.common.secagg.testbed import partition_key_path, write_testbed

LAYOUT = VectorLayout({"w": (5,)}, {"w": "shared"})


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Roster, dict[str, object]]:
    folder = tmp_path_factory.mktemp("bed")
    names = [f"site{i}" for i in range(6)]
    roster = write_testbed(folder, names)
    return roster, {name: load_signing_key(partition_key_path(folder, i)) for i, name in enumerate(names)}


def _config(n: int, **kw: object) -> SecAggConfig:
    return SecAggConfig.create(list(range(1, n + 1)), LAYOUT, clip=1.0, **kw)  # type: ignore[arg-type]


def test_policy_defaults_refuse_weakened_rounds_and_accept_the_library_defaults() -> None:
    policy = SitePolicy()
    for n in (3, 5, 10, 20, 50):
        check_round(_config(n), policy)  # the coordinator's defaults are always acceptable
    with pytest.raises(ProtocolViolation, match="graph degree 4"):
        check_round(_config(20, degree=4, threshold=3), policy)
    with pytest.raises(ProtocolViolation, match="threshold 4 of 7"):
        check_round(_config(7, threshold=4), policy)
    with pytest.raises(ProtocolViolation, match="at least 3"):
        check_round(_config(2, allow_two_sites=True), policy)
    check_round(_config(2, allow_two_sites=True), SitePolicy(allow_two_sites=True))
    check_round(_config(20, degree=10, threshold=8), SitePolicy(min_degree=10))
    assert SitePolicy().required_threshold(14) == 10
    assert SitePolicy(min_threshold_fraction=0.5).required_threshold(6) == 4
    with pytest.raises(ValueError, match="min-threshold"):
        SitePolicy(min_threshold_fraction=0.4)


def test_advertisements_verify_only_for_the_signed_site_node_and_round(bed: tuple[Roster, dict]) -> None:
    roster, keys = bed
    config = _config(3)
    adv = {n: AdvertisedKeys(bytes([n]) * 32, bytes([n + 10]) * 32, f"site{n}") for n in (1, 2, 3)}
    signed = {n: AdvertisedKeys(a.encryption_key, a.mask_key, a.site_id,
                                advertisement_signature(keys[a.site_id], a.site_id, n, a, config, roster))
              for n, a in adv.items()}
    assert verify_advertisements(roster, config, signed, 1, "site1", SitePolicy()) == {1: "site1", 2: "site2",
                                                                                        3: "site3"}
    with pytest.raises(ProtocolViolation, match="no valid signature"):  # signed for another round
        verify_advertisements(roster, _config(3), signed, 1, "site1", SitePolicy())
    config4 = _config(4)
    both = {**adv, 4: AdvertisedKeys(b"\x04" * 32, b"\x05" * 32, "site2")}  # site2 signs a second node id
    signed4 = {n: AdvertisedKeys(a.encryption_key, a.mask_key, a.site_id,
                                 advertisement_signature(keys[a.site_id], a.site_id, n, a, config4, roster))
               for n, a in both.items()}
    with pytest.raises(ProtocolViolation, match="more than one node id"):
        verify_advertisements(roster, config4, signed4, 1, "site1", SitePolicy())


def test_survivor_signatures_need_a_majority_on_the_exact_request(bed: tuple[Roster, dict]) -> None:
    roster, keys = bed
    config = _config(6)
    sites = {n: f"site{n - 1}" for n in range(1, 7)}
    request = UnmaskRequest((1, 2, 3, 4, 5, 6), ())
    assert required_signers(config) == 4  # threshold 4 of 6 holders on the complete graph; majority 4
    sigs = {n: survivors_signature(keys[sites[n]], config, request) for n in (1, 2, 3, 4)}
    assert verify_survivor_signatures(roster, config, request, sites, sigs) == 4
    with pytest.raises(ProtocolViolation, match="consistency check"):
        verify_survivor_signatures(roster, config, request, sites, {n: sigs[n] for n in (1, 2, 3)})
    with pytest.raises(ProtocolViolation, match="consistency check"):  # signatures of another request
        verify_survivor_signatures(roster, config, UnmaskRequest((1, 2, 3, 4, 5), (6,)), sites, sigs)


def test_signed_round_equals_the_unsigned_sum_with_dropouts(bed: tuple[Roster, dict]) -> None:
    roster, keys = bed
    config = _config(6, weight_bound=10.0)  # weights up to 10: fine quantisation
    rng = np.random.default_rng(0)
    updates = {n: {"w": rng.uniform(-0.5, 0.5, 5)} for n in config.node_ids}
    weights = {n: {"shared": float(n)} for n in config.node_ids}
    ids = {n: (f"site{n - 1}", keys[f"site{n - 1}"]) for n in config.node_ids}
    result = run_round(config, LAYOUT, updates, weights, drop_after={6: 2}, identities=ids, roster=roster)
    expected = sum(weights[n]["shared"] * updates[n]["w"] for n in range(1, 6))
    np.testing.assert_allclose(result.sums["w"], expected, rtol=1e-6, atol=1e-6)
    assert result.survivors == (1, 2, 3, 4, 5)


def test_testbed_writes_keys_the_roster_lists(tmp_path: Path) -> None:
    roster = write_testbed(tmp_path, ["a", "b"])
    assert roster.site_of(load_signing_key(partition_key_path(tmp_path, 1)).public_key()) == "b"
    assert Roster.load(tmp_path / "roster.json").fingerprint == roster.fingerprint
