"""The coordinator's Flower ServerApp: parse the run config, run the rounds, write the run folder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfusion.common.config import ConfigError
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.flower_adapter import check_flower_version
from fedfusion.server.federation import FederationResult, RunIncomplete, run_federation
from fedfusion.server.report import write_run_outputs
from fedfusion.server.tracking import log_report_files

#: How to make a simulated run's site data, named by every error about it (docs/flower-cli.md).
BUILD_SITES_HINT = ("build them with `fedfusion datasets build ovarian data/ovarian --partition natural` and pass "
                    "the --run-config it prints (docs/flower-cli.md)")


def is_simulation(grid: Grid, run_config: Mapping[str, Any]) -> bool:
    """Whether this run's sites are Flower's virtual simulation nodes (they know only a ``partition-id``).

    Flower offers no public flag for it: the run config saying so (``data-dir``, ``sites`` or
    ``scale-sites``, which only simulated sites read) or the simulation runtime's Grid class name (Flower
    1.41's ``InMemoryGrid``; compared by name so that no Flower internal is imported).
    """
    said = any(str(run_config.get(key, "") or "").strip() not in ("", "0") for key in ("data-dir", "sites",
                                                                                       "scale-sites"))
    return said or type(grid).__name__ == "InMemoryGrid"


def simulation_inputs_problem(run_config: Mapping[str, Any], num_nodes: int) -> str | None:
    """Why a simulated run cannot find its sites' data (one line naming the key and the fix), or None.

    Checked by the ServerApp before round 0: otherwise every virtual site raises inside a Ray worker
    and the run fails a round later with a message that names neither the missing key nor the fix.
    ``num_nodes`` is how many virtual SuperNodes the runtime started (``num-supernodes``; 0: unknown).
    """
    from fedfusion.client.runtime import site_manifest_path
    from fedfusion.simulations.scale_sites import POOLED_MANIFEST

    cfg = FederationConfig.from_run_config(run_config)
    scale = int(cfg.raw.get("scale-sites", 0) or 0)
    needed = ("schema", "data-dir") if scale > 0 else ("schema", "data-dir", "sites")
    missing = [key for key in needed if not str(cfg.raw.get(key, "") or "").strip()]
    if missing:
        keys = ", ".join(f"'{key}'" for key in missing)
        return (f"run config lacks {keys}: simulated sites read <data-dir>/site-<name>.csv for the names in "
                f"'sites' (in partition-id order); {BUILD_SITES_HINT}")
    where = f"relative paths start at {Path.cwd()}"
    if not Path(cfg.schema).is_file():
        return f"run config schema = {cfg.schema!r}: no such file ({where}); {BUILD_SITES_HINT}"
    if scale > 0:
        pooled = Path(cfg.data_dir) / POOLED_MANIFEST
        return None if pooled.is_file() else f"run config data-dir: no {pooled} ({where}); {BUILD_SITES_HINT}"
    absent = [site_manifest_path(cfg.data_dir, site) for site in cfg.sites]
    absent = [path for path in absent if not path.is_file()]
    if absent:
        return (f"run config sites: {len(absent)} of {len(cfg.sites)} site manifests are missing, e.g. {absent[0]} "
                f"({where}); {BUILD_SITES_HINT}")
    if num_nodes and num_nodes != len(cfg.sites):
        return (f"the simulation has {num_nodes} SuperNodes but run config 'sites' lists {len(cfg.sites)} "
                f"({','.join(cfg.sites)}): pass --federation-config \"num-supernodes={len(cfg.sites)}\"")
    return None


def make_server_app(overrides: Mapping[str, Any] | None = None,
                    on_round: Callable[[dict[str, Any]], None] | None = None,
                    on_done: Callable[[FederationResult], None] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` stand in for the run config where Flower passes none (in-process
    simulation). ``on_round``/``on_done`` let the simulate command show progress and keep results."""
    check_flower_version("fedfusion ServerApp")
    overrides = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = {**overrides, **dict(context.run_config)}
        cfg = FederationConfig.from_run_config(run_config)
        if is_simulation(grid, run_config):  # one clear line in `flwr ls` / `flwr log`, not failures inside Ray
            problem = simulation_inputs_problem(run_config, len(list(grid.get_node_ids())))
            if problem is not None:
                raise ConfigError(problem)
        result = run_federation(grid, cfg, on_round=on_round)
        write_run_outputs(result)
        log_report_files(cfg.raw, result.run_dir)  # MLflow on: report, metrics and plots as artifacts
        if on_done is not None:  # in-process callers (simulate, experiments) get the result and decide
            on_done(result)
        elif result.ended_early:  # deployed: failing is the only way to tell `flwr ls` / `fedfusion run`
            raise RunIncomplete(f"{result.ended_early}; the report is in {result.run_dir}")

    return app


app = make_server_app()
