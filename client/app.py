"""The site's Flower ClientApp: parse config, call the site runtime, wrap the result in records.

Only the updated weights and aggregate numbers (example counts, loss, metrics, ε spent) leave the
site; with sample-level DP the training loss stays home (ε does not cover it). A round the site's
privacy policy or budget does not allow is *refused*: the reply carries the reason and the ε spent
so far instead of an update, and the server records it. Evaluation replies (test-split metrics) are
not covered by the training ε; they are aggregates of held-out cases, rounded, and only counts for a
split smaller than the site's ``min-eval-cases`` (:mod:`fedfusion.client.eval_release`).

With sample-level DP every released update is also kept beside the ledger (:mod:`fedfusion.client.releases`):
when a resumed coordinator asks for a round this site already released (same study, round, model and
settings), the site re-sends that update instead of training and spending ε a second time.

Client-level (central) DP: Flower's ``fixedclipping_mod`` clips the update when the server's
``DifferentialPrivacyClientSideFixedClipping`` wrapper asks for it (a ``clipping_norm`` in the train
config). It is attached to the train function only: in Flower 1.41 the mod does not skip evaluate
messages, and it turns any train message without a clipping norm into an error, so
:func:`clip_update_when_asked` calls it only when asked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from fedfusion.client.audit_mod import audit_mod
from fedfusion.client.eval_release import eval_release_policy, release_eval_metrics
from fedfusion.client.releases import ReleaseStore, request_key
from fedfusion.client.reply_signing import reply_signing_mod
from fedfusion.client.runtime import SiteRuntime, round_privacy, site_from_context, site_policy, study_name
from fedfusion.client.secure_aggregation import refuse_unmasked_update, register_secure_aggregation
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.flower_adapter import KEY_CLIPPING_NORM, ClientAppCallable, check_flower_version
from fedfusion.common.packing import LAYOUT_KEY, is_packed, load_received, pack_reply
from fedfusion.common.privacy_policy import PrivacyError, PrivacyPolicy
from fedfusion.common.records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EPSILON_KEY,
    METRICS_KEY,
    REFUSED_KEY,
    SITE_KEY,
    arrays_to_numpy,
    metrics_record,
    refusal_reason,
)

log = logging.getLogger("fedfusion.client")

#: Seconds the site's train handler took in all (``train-seconds`` is the local training loop alone).
CLIENT_SECONDS_KEY = "client-seconds"


def clip_update_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` for client-level DP runs; a plain pass-through otherwise.

    A refusal (no update to clip) is passed back as it is, so the server sees the site's reason.
    """
    config = msg.content.config_records.get(CONFIG_KEY)
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    replies: list[Message] = []

    def inner(message: Message, ctx: Context) -> Message:
        replies.append(call_next(message, ctx))
        return replies[-1]

    clipped = fixedclipping_mod(msg, context, inner)
    if replies and refusal_reason(replies[0]) is not None:
        return replies[0]
    return clipped


def _spent(policy: PrivacyPolicy | None, cfg: FederationConfig, site: SiteRuntime) -> dict[str, float]:
    """ε the study has spent here, for a refusal reply (nothing if the ledger cannot be read)."""
    from fedfusion.client.ledger import PrivacyLedger

    if policy is None:
        return {}
    try:
        delta = cfg.privacy.target_delta or policy.delta
        return {EPSILON_KEY: PrivacyLedger.for_policy(policy, site.site_id).epsilon(study_name(cfg, site.schema),
                                                                                 delta)}
    except (PrivacyError, OSError):
        return {}


def _personalization(cfg: FederationConfig, site: SiteRuntime, node_config: Mapping[str, Any],
                     run_config: Mapping[str, Any]) -> Any:
    """The site's personalisation (private parts, fine-tuning); imported here, not at the top, to keep
    this module's import block to Flower and the site runtime."""
    from fedfusion.client.personalization import SitePersonalization

    return SitePersonalization.for_site(cfg, site, node_config, run_config)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``overrides`` stand in for the run config where Flower passes none (in-process
    simulation), the run config wins otherwise."""
    check_flower_version("fedfusion ClientApp")
    overrides = dict(overrides or {})
    # audit_mod outermost: records every reply, of every message type, as it leaves (signed when the site
    # has a key: reply_signing_mod lets the coordinator attribute it to this site, not a claimed id)
    app = ClientApp(mods=[audit_mod, reply_signing_mod])

    def _config(context: Context) -> tuple[FederationConfig, dict[str, Any]]:
        run_config = {**overrides, **dict(context.run_config)}
        return FederationConfig.from_run_config(run_config), run_config

    # In a secure-aggregation run a plain train request is refused; the secagg stages call `train` directly.
    @app.train(mods=[refuse_unmasked_update(_config), clip_update_when_asked])
    def train(msg: Message, context: Context) -> Message:
        began = time.perf_counter()
        cfg, run_config = _config(context)
        node_config = dict(context.node_config)
        site = site_from_context(node_config, run_config)
        config = msg.content[CONFIG_KEY]
        server_round = int(config["server-round"])
        policy: PrivacyPolicy | None = None
        try:
            policy = site_policy(node_config, run_config, site.site_id)
            privacy = round_privacy(site, policy, cfg, server_round,
                                    note={"run": context.run_id, "round": server_round})
            if privacy is not None:  # the same request as an earlier release: send that again, spend no ε
                releases = ReleaseStore.beside_ledger(policy.ledger)
                key = request_key(site.site_id, privacy.study, server_round, cfg.config_hash(),
                                  arrays_to_numpy(msg.content[ARRAYS_KEY]), dict(config))
                released = releases.get(site.site_id, privacy.study, key)
                if released is not None:
                    log.warning("round %d: the coordinator asks again for a round this site already released "
                                "(study %s; e.g. it resumed after a crash): re-sending that update, no new ε",
                                server_round, privacy.study)
                    return Message(released, reply_to=msg)
            model = load_received(msg.content[ARRAYS_KEY], config,
                                  site.build_model(cfg.model, fresh=privacy is not None))
            personal = _personalization(cfg, site, node_config, run_config)  # private parts: kept, never sent
            personal.before_training(model, server_round)
            metrics = site.train(model, cfg.train, server_round, proximal_mu=float(config.get("proximal-mu", 0.0)),
                                 privacy=privacy)
            personal.after_training(server_round)  # Ditto: the site's own model, trained after the update; kept
        except PrivacyError as refusal:
            return Message(RecordDict({METRICS_KEY: MetricRecord(_spent(policy, cfg, site)),
                                       SITE_KEY: ConfigRecord({"site-id": site.site_id, REFUSED_KEY: str(refusal)})}),
                           reply_to=msg)
        # The whole handler (site build, model build and (de)serialisation, training): what the site
        # spends besides "train-seconds" is ours to cut (benchmarks/scale.py splits a round by it).
        metrics = {**metrics, CLIENT_SECONDS_KEY: time.perf_counter() - began}
        state, site_record = personal.reply_state(model, server_round), {"site-id": site.site_id}
        if is_packed(config):  # answered in the format asked in (a per-tensor request gets per-tensor arrays)
            arrays, site_record[LAYOUT_KEY] = pack_reply(state, model)
        else:
            arrays = ArrayRecord(state)
        content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics_record(metrics),
                              SITE_KEY: ConfigRecord(site_record)})
        if privacy is not None:  # on disk before it leaves: a resumed run's identical request gets it again
            releases.put(site.site_id, privacy.study, key, content)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, run_config = _config(context)
        site = site_from_context(dict(context.node_config), run_config)
        model = load_received(msg.content[ARRAYS_KEY], msg.content.config_records.get(CONFIG_KEY),
                              site.build_model(cfg.model))
        server_round = int(msg.content[CONFIG_KEY].get("server-round", 0)) if CONFIG_KEY in msg.content else 0
        personal = _personalization(cfg, site, dict(context.node_config), run_config)
        personal.before_evaluation(model, server_round)  # the site's own private parts, if any
        raw = site.evaluate(model)
        if personal.personal_due(server_round):  # FedAvg+FT's fine-tuned copy or Ditto's model, scored only
            raw.update(personal.personal_evaluation(model, server_round))
        # Small splits release only counts, metrics are rounded: evaluation is no uncharged oracle.
        metrics = release_eval_metrics(raw, eval_release_policy(dict(context.node_config), run_config))
        return Message(RecordDict({METRICS_KEY: metrics_record(metrics),
                                   SITE_KEY: ConfigRecord({"site-id": site.site_id})}), reply_to=msg)

    register_secure_aggregation(app, train, _config)
    return app


app = make_client_app()
