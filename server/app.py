"""The coordinator's Flower ServerApp: parse the run config, run the rounds, write the run folder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfusion.common.federation_config import FederationConfig
from fedfusion.server.federation import FederationResult, RunIncomplete, run_federation
from fedfusion.server.report import write_run_outputs


def make_server_app(overrides: Mapping[str, Any] | None = None,
                    on_round: Callable[[dict[str, Any]], None] | None = None,
                    on_done: Callable[[FederationResult], None] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` stand in for the run config where Flower passes none (in-process
    simulation). ``on_round``/``on_done`` let the simulate command show progress and keep results."""
    overrides = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = FederationConfig.from_run_config({**overrides, **dict(context.run_config)})
        result = run_federation(grid, cfg, on_round=on_round)
        write_run_outputs(result)
        if on_done is not None:  # in-process callers (simulate, experiments) get the result and decide
            on_done(result)
        elif result.ended_early:  # deployed: failing is the only way to tell `flwr ls` / `fedfusion run`
            raise RunIncomplete(f"{result.ended_early}; the report is in {result.run_dir}")

    return app


app = make_server_app()
