"""Site data for Flower's own ``flwr run .`` (simulation runtime) and the run config that points at it.

Why: a Flower user starts a federation with ``flwr run . CONNECTION``, not ``fedfusion simulate``. In
Flower's simulation runtime each virtual SuperNode only knows its ``partition-id``; the ClientApp maps
partition ``i`` to the ``i``-th name of the run config's ``sites`` and reads
``<data-dir>/site-<name>.csv`` (:func:`fedfusion.client.runtime.site_from_context`), and the ServerApp
needs ``schema`` to build the model. This module writes exactly that layout (the shipped data set's
pooled manifest, then one manifest per site, as ``fedfusion simulate`` does) and renders the
``--run-config`` that names it with absolute paths: the ServerApp and the Ray workers resolve paths
against the SuperLink's working folder, not the folder ``flwr run`` was typed in.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from fedfusion.common.config import load_schema
from fedfusion.common.manifest import load_manifest
from fedfusion.common.progress import StepCallback, report
from fedfusion.server.coordinator import toml_value
from fedfusion.simulations.datasets import build_dataset
from fedfusion.simulations.partition import partition_manifest


@dataclass(frozen=True)
class FlwrRunData:
    """Where a ``flwr run`` simulation finds its sites, in partition-id order."""

    schema: Path
    data_dir: Path
    sites: tuple[str, ...]
    run_dir: Path

    def run_config(self) -> dict[str, str]:
        """The four run-config keys a simulated run needs (everything else has a default)."""
        return {"schema": str(self.schema), "data-dir": str(self.data_dir), "sites": ",".join(self.sites),
                "run-dir": str(self.run_dir)}

    def run_config_arg(self) -> str:
        """The ``--run-config`` value: space-separated ``key="value"`` pairs, as Flower parses them."""
        return " ".join(f"{key}={toml_value(value)}" for key, value in self.run_config().items())

    def command(self, connection: str = "CONNECTION") -> str:
        """The whole ``flwr run`` command, one simulated SuperNode per site, quoted for a POSIX shell."""
        return (f'flwr run . {connection} --federation-config "num-supernodes={len(self.sites)}" '
                f"--run-config {shlex.quote(self.run_config_arg())}")


def build_flwr_sites(name: str, out_dir: str | Path, partition: str = "natural", num_sites: int = 3, seed: int = 0,
                     run_dir: str | Path | None = None, on_step: StepCallback | None = None) -> FlwrRunData:
    """Build shipped data set ``name`` into ``out_dir`` and split it into site manifests beside it.

    ``partition`` and ``num_sites`` are ``fedfusion simulate``'s (``natural`` = the data's real sites;
    ``num_sites`` only counts for simulated splits). ``run_dir`` (default ``runs/flwr-<name>``) is
    resolved against the current folder now, so the printed config does not depend on where the
    SuperLink was started. Raises DatasetError, PartitionError or ManifestError with the reason.
    """
    data_dir = Path(out_dir).resolve()
    schema_path = build_dataset(name, data_dir, seed=seed, on_step=on_step)
    schema = load_schema(schema_path)
    report(on_step, f"writing one manifest per site ({partition} partition)", detail=str(data_dir))
    sites = partition_manifest(data_dir / "manifest.csv", schema, partition, num_sites, seed)
    for path in sites.values():  # fail here, naming the file, not later inside a Ray worker
        load_manifest(path, schema, check_images=False, allow_single_class=partition != "natural")
    target = Path(run_dir) if run_dir is not None else Path("runs") / f"flwr-{name}"
    return FlwrRunData(schema=schema_path, data_dir=data_dir, sites=tuple(sites), run_dir=target.resolve())
