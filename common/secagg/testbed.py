"""Keys and a roster for sites that all run on one machine (simulations, tests, benchmarks).

Why: a site refuses secure aggregation without a roster (:mod:`fedfusion.client.secagg_identity`), and a
simulation has no kits. Simulated sites are all local, so one process may make every site's key; a
real federation never does this (each site keeps its own private key, ``fedfusion provision`` or the
site makes it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedfusion.common.roster import Roster, write_roster

SIMULATION_KEYS_KEY = "secagg-simulation-keys"
"""Run-config key naming the folder of :func:`write_testbed` (honoured only for simulated nodes)."""


def partition_key_path(folder: str | Path, partition: int) -> Path:
    return Path(folder) / f"partition-{int(partition)}.key"


def new_signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_line(key: ec.EllipticCurvePrivateKey, comment: str) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{raw.decode()} {comment}"


def write_testbed(folder: str | Path, site_ids: Sequence[str]) -> Roster:
    """``folder/partition-<i>.key`` (OpenSSH ECDSA P-256) for site ``site_ids[i]`` and ``folder/roster.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = {}
    for i, site in enumerate(site_ids):
        key = new_signing_key()
        path = partition_key_path(folder, i)
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        lines[str(site)] = public_line(key, str(site))
    return write_roster(folder / "roster.json", lines)


def with_simulation_keys(run_config: dict[str, Any], num_sites: int) -> dict[str, Any]:
    """``run_config`` plus :data:`SIMULATION_KEYS_KEY` naming a test bed for ``num_sites`` simulated sites,
    when secure aggregation is on and none is named yet. The folder is ``<run-dir>/secagg-testbed`` (the same
    on a resume, so the run's config hash is unchanged), or a temporary folder without a run dir."""
    from fedfusion.common.secagg.settings import SecureAggregationSettings

    if run_config.get(SIMULATION_KEYS_KEY) or not SecureAggregationSettings.from_run_config(run_config).enabled:
        return run_config
    run_dir = str(run_config.get("run-dir", "") or "")
    folder = Path(run_dir) / "secagg-testbed" if run_dir else Path(tempfile.mkdtemp(prefix="fedfusion-secagg-"))
    if not (folder / "roster.json").is_file() or any(not partition_key_path(folder, i).is_file()
                                                     for i in range(num_sites)):
        write_testbed(folder, [f"simulated-site-{i}" for i in range(num_sites)])
    return {**run_config, SIMULATION_KEYS_KEY: str(folder)}
