"""The site's Flower ClientApp: parse config, call the site runtime, wrap the result in records.

Only the updated weights and aggregate numbers (example counts, loss, metrics) leave the site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedfusion.client.runtime import site_from_context
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    SITE_KEY,
    arrays_to_model,
    metrics_record,
    model_to_arrays,
)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` stand in for the run config where Flower passes none (in-process
    simulation), the run config wins otherwise."""
    overrides = dict(overrides or {})
    app = ClientApp()

    def _config(context: Context) -> tuple[FederationConfig, dict[str, Any]]:
        run_config = {**overrides, **dict(context.run_config)}
        return FederationConfig.from_run_config(run_config), run_config

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, run_config = _config(context)
        site = site_from_context(dict(context.node_config), run_config)
        model = arrays_to_model(msg.content[ARRAYS_KEY], site.build_model(cfg.model))
        config = msg.content[CONFIG_KEY]
        metrics = site.train(model, cfg.train, int(config["server-round"]),
                             proximal_mu=float(config.get("proximal-mu", 0.0)))
        return Message(RecordDict({ARRAYS_KEY: model_to_arrays(model), METRICS_KEY: metrics_record(metrics),
                                   SITE_KEY: ConfigRecord({"site-id": site.site_id})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, run_config = _config(context)
        site = site_from_context(dict(context.node_config), run_config)
        model = arrays_to_model(msg.content[ARRAYS_KEY], site.build_model(cfg.model))
        metrics = site.evaluate(model)
        return Message(RecordDict({METRICS_KEY: metrics_record(metrics),
                                   SITE_KEY: ConfigRecord({"site-id": site.site_id})}), reply_to=msg)

    return app


app = make_client_app()
