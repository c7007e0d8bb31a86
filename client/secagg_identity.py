"""Who this site is in a secure round: its roster, its signing key, its site id and its policy.

Why a separate module: these come from the site (node config, written by ``fedfusion site start`` from
site.toml ``[federation] roster``, ``[auth] private-key`` and ``[secure-aggregation]``), never from the
coordinator's run config. Without a roster a site cannot tell real peers from sites the coordinator
invents, so it refuses secure aggregation.

Node-config keys (flat, as Flower's ``--node-config`` carries them):
``roster`` (path), ``signing-key`` (path), ``site-id``, and the policy keys ``secagg-min-sites``,
``secagg-min-degree``, ``secagg-min-threshold``, ``secagg-allow-two-sites``.

Simulation: Flower's simulation runtime gives a node only ``partition-id``; the simulation runner then
writes one key per partition and a roster into a folder it names in the run config
(:data:`SIMULATION_KEYS_KEY`, see :func:`fedfusion.common.secagg.testbed.write_testbed`). That path is
honoured only with ``partition-id`` in the node config, which a deployed site's daemon never sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedfusion.common.roster import Roster, RosterError, load_signing_key
from fedfusion.common.secagg.errors import ProtocolViolation
from fedfusion.common.secagg.signing import DEFAULT_MIN_THRESHOLD_FRACTION, SitePolicy
from fedfusion.common.secagg.testbed import SIMULATION_KEYS_KEY, partition_key_path

ROSTER_NODE_KEY = "roster"
SIGNING_KEY_NODE_KEY = "signing-key"
POLICY_NODE_KEYS = ("secagg-min-sites", "secagg-min-degree", "secagg-min-threshold", "secagg-allow-two-sites")
NO_ROSTER = ("secure aggregation needs this site's federation roster: set [federation] roster = \"roster.json\" "
             "(from the site's kit) and [auth] private-key in site.toml; without it the coordinator could invent "
             "the other sites of a round")


@dataclass(frozen=True)
class SiteIdentity:
    site_id: str
    key: ec.EllipticCurvePrivateKey
    roster: Roster
    policy: SitePolicy


def site_policy(node_config: Mapping[str, Any]) -> SitePolicy:
    """``[secure-aggregation]`` from the node config; missing keys take the safe defaults."""
    try:
        return SitePolicy(
            min_sites=int(node_config.get("secagg-min-sites", 3)),
            allow_two_sites=truthy(node_config.get("secagg-allow-two-sites", False)),
            min_degree=int(node_config.get("secagg-min-degree", 0)),
            min_threshold_fraction=float(node_config.get("secagg-min-threshold", DEFAULT_MIN_THRESHOLD_FRACTION)))
    except ValueError as err:
        raise ProtocolViolation(f"this site's [secure-aggregation] policy is invalid: {err}") from None


def site_identity(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteIdentity:
    """Load the roster and signing key named by the node config (or the simulation's keys folder)."""
    try:
        if node_config.get(ROSTER_NODE_KEY):
            if not node_config.get(SIGNING_KEY_NODE_KEY):
                raise ProtocolViolation("[federation] roster is set but no signing key: set [auth] private-key in "
                                        "site.toml (the key the roster lists for this site)")
            roster = Roster.load(str(node_config[ROSTER_NODE_KEY]))
            key = load_signing_key(str(node_config[SIGNING_KEY_NODE_KEY]))
            site_id = str(node_config.get("site-id", ""))
        elif "partition-id" in node_config and run_config.get(SIMULATION_KEYS_KEY):
            folder = Path(str(run_config[SIMULATION_KEYS_KEY]))
            roster = Roster.load(folder / "roster.json")
            key = load_signing_key(partition_key_path(folder, int(node_config["partition-id"])))
            site_id = roster.site_of(key.public_key()) or ""
        else:
            raise ProtocolViolation(NO_ROSTER)
    except RosterError as err:
        raise ProtocolViolation(f"{err} ({NO_ROSTER})") from None
    if roster.site_of(key.public_key()) != site_id or site_id not in roster.keys:
        raise ProtocolViolation(f"the roster {roster.source} does not list this site's signing key under its site id "
                                f"{site_id!r}: check [site] id, [auth] private-key and [federation] roster")
    return SiteIdentity(site_id, key, roster, site_policy(node_config))


def truthy(value: Any) -> bool:
    """A node-config boolean (node config values arrive as strings)."""
    return value.strip().lower() in ("1", "true", "yes", "on") if isinstance(value, str) else bool(value)


def node_config_from_site_toml(raw: Mapping[str, Any], path: Path, private_key: Path | None) -> dict[str, str]:
    """``[federation] roster`` and ``[secure-aggregation]`` of site.toml as node-config pairs (the
    signing key is ``[auth] private-key``). ``ValueError`` names the file, table and key that is wrong.

    ``[secure-aggregation]`` keys and defaults: ``min-sites = 3``, ``allow-two-sites = false``,
    ``min-degree = 0`` (the library default for the round's size), ``min-threshold = 0.667`` (fraction
    of the degree + 1 share holders; always at least a strict majority)."""
    pairs: dict[str, str] = {}
    federation = raw.get("federation", {})
    if not isinstance(federation, dict):
        raise ValueError(f"{path}: [federation] must be a table")
    roster = federation.get("roster")
    if roster is not None:
        if not isinstance(roster, str) or not roster.strip():
            raise ValueError(f'{path}: [federation] roster must be a file path, e.g. roster = "roster.json"')
        candidate = Path(roster)
        pairs[ROSTER_NODE_KEY] = str(candidate if candidate.is_absolute() else (path.parent / candidate).resolve())
        if private_key is None:
            raise ValueError(f"{path}: [federation] roster needs [auth] private-key: the site signs its secure-"
                             "aggregation keys with it")
        pairs[SIGNING_KEY_NODE_KEY] = str(private_key)
    table = raw.get("secure-aggregation", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [secure-aggregation] must be a table")
    kinds = {"min-sites": int, "min-degree": int, "min-threshold": float, "allow-two-sites": bool}
    for key, value in table.items():
        kind = kinds.get(key)
        if kind is None:
            raise ValueError(f"{path}: [secure-aggregation] {key} is not a setting; expected one of {sorted(kinds)}")
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind | (int if kind is float else kind)):
            what = {int: "a whole number", float: "a number", bool: "true or false"}[kind]
            raise ValueError(f"{path}: [secure-aggregation] {key} must be {what}, got {value!r}")
        pairs[f"secagg-{key}"] = str(value).lower() if kind is bool else str(value)
    try:
        site_policy(pairs)  # the bounds themselves (e.g. min-threshold in 0.5..1), checked at `site check`
    except ProtocolViolation as err:
        raise ValueError(f"{path}: {err}") from None
    return pairs
