"""The site's identity for secure aggregation (client/secagg_identity.py): site.toml [federation] roster
and [secure-aggregation] reach the node config through ``fedfusion site start``; the roster and the site's
own key are loaded from there; a site without a roster, or whose key the roster lists under another id,
refuses; the simulation's keys folder is honoured only for simulated nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfusion.client.daemon import SiteConfig
from fedfusion.client.secagg_identity import NO_ROSTER, node_config_from_site_toml, site_identity, site_policy
from fedfusion.common.config import ConfigError
from fedfusion.common.secagg import ProtocolViolation
from fedfusion.common.secagg.testbed import SIMULATION_KEYS_KEY, partition_key_path, write_testbed

BASE = '[site]\nid = "B"\nmanifest = "m.csv"\nschema = "s.json"\n[coordinator]\naddress = "c:1"\ninsecure = true\n'


def _node_config(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    pairs = {}
    for item in SiteConfig.load(path).node_config().split('" '):
        key, _, value = item.partition('="')
        pairs[key] = value.rstrip('"')
    return pairs


def test_site_toml_roster_and_policy_reach_the_node_config_and_load(tmp_path: Path) -> None:
    write_testbed(tmp_path, ["A", "B", "C"])
    # [auth] needs TLS, which this unit test has no certificates for: the table parser itself
    nc = {"site-id": "B", **node_config_from_site_toml(
        {"federation": {"roster": "roster.json"}, "secure-aggregation": {"min-degree": 4, "min-threshold": 0.75}},
        tmp_path / "site.toml", partition_key_path(tmp_path, 1))}
    assert nc["roster"] == str(tmp_path / "roster.json") and nc["secagg-min-degree"] == "4"
    identity = site_identity(nc, {})
    assert identity.site_id == "B" and identity.policy.min_degree == 4
    assert identity.policy.min_threshold_fraction == 0.75 and sorted(identity.roster.keys) == ["A", "B", "C"]
    assert "min-degree" not in _node_config(tmp_path, BASE) and "roster" not in _node_config(tmp_path, BASE)


@pytest.mark.parametrize(("table", "needle"), [
    ("[secure-aggregation]\nmin-threshold = 0.3\n", "min-threshold must be a fraction"),
    ("[secure-aggregation]\nmin-sites = \"3\"\n", "min-sites must be a whole number"),
    ("[secure-aggregation]\nallow-2-sites = true\n", "allow-2-sites is not a setting"),
    ('[federation]\nroster = "roster.json"\n', "needs [auth] private-key"),
])
def test_bad_secure_aggregation_tables_are_named(tmp_path: Path, table: str, needle: str) -> None:
    (tmp_path / "site.toml").write_text(BASE + table, encoding="utf-8")
    with pytest.raises(ConfigError, match="site.toml") as err:
        SiteConfig.load(tmp_path / "site.toml")
    assert needle in str(err.value)


def test_no_roster_or_a_foreign_key_is_refused(tmp_path: Path) -> None:
    write_testbed(tmp_path, ["A", "B"])
    with pytest.raises(ProtocolViolation) as err:
        site_identity({"site-id": "A"}, {})
    assert NO_ROSTER in str(err.value)
    with pytest.raises(ProtocolViolation, match="does not list this site's signing key under its site id 'A'"):
        site_identity({"site-id": "A", "roster": str(tmp_path / "roster.json"),
                       "signing-key": str(partition_key_path(tmp_path, 1))}, {})
    with pytest.raises(ProtocolViolation, match="roster file not found"):
        site_identity({"site-id": "A", "roster": str(tmp_path / "nope.json"),
                       "signing-key": str(partition_key_path(tmp_path, 0))}, {})


def test_simulation_keys_count_only_for_simulated_nodes(tmp_path: Path) -> None:
    write_testbed(tmp_path, ["sim-0", "sim-1"])
    run = {SIMULATION_KEYS_KEY: str(tmp_path)}
    assert site_identity({"partition-id": 1}, run).site_id == "sim-1"
    with pytest.raises(ProtocolViolation, match="roster"):  # a deployed site (no partition-id) ignores it
        site_identity({"site-id": "sim-1"}, run)
    assert site_policy({}).fewest_sites == 3 and not site_policy({}).allow_two_sites
