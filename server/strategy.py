"""Strategies: Flower's FedAvg / FedProx / FedAdam made modality-aware by one subclass.

A site without omics never trains the omics encoder: averaging its untouched copy into the
global omics weights would drag them back toward the previous round. So each parameter group
(one per modality encoder, plus the shared fusion/head) is averaged only over the sites that
trained it, weighted by how many of their training cases had that modality.

Composition follows Flower's idiom: ``ModalityAwareFedAvg`` overrides only ``aggregate_train``;
``FedProx``/``FedAdam`` variants put Flower's class first in the MRO so their own logic
(proximal term in the config, server-side Adam on the aggregated update) runs on top of ours.
Replies are also checked before use: shapes, dtypes and finiteness; a bad update is dropped and
reported, never averaged.

Private parts (``private-parts``, FedPer-style; :mod:`fedfusion.common.personalization`): the keys in
``private_keys`` are kept by the sites and are absent from their replies. They are neither expected nor
averaged (a reply that sends them anyway has them ignored); the global model keeps their initial values,
and every other key is averaged exactly as without them.

No private Flower code is called (see :mod:`fedfusion.common.flower_adapter`): the reply split and
consistency check (:func:`check_and_log_replies`) and FedAdam's server step with its moments
(:meth:`ModalityAwareFedAdam.aggregate_train`) are ours, written to give Flower 1.41's results bit for bit
(``tests/unit/test_flower_canaries.py`` compares them with Flower's own while those exist).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedfusion.common.config import is_modality
from fedfusion.common.flower_adapter import InconsistentMessageReplies
from fedfusion.common.flower_adapter import flower_log as log
from fedfusion.common.packing import LAYOUT_KEY, SHARED_GROUP, LayoutMismatch, PackLayout, group_of_key, sent_layout
from fedfusion.common.records import (
    MODALITY_COUNT_KEYS,
    NUM_EXAMPLES,
    SITE_KEY,
    arrays_to_numpy,
    modality_count,
    modality_count_key,
    numpy_to_arrays,
)

__all__ = ["SHARED_GROUP", "group_of_key"]  # defined with the wire format (common/packing.py), used here


def modality_weighted_average(
    updates: list[dict[str, np.ndarray]],
    counts: list[Mapping[str, float]],
    current: Mapping[str, np.ndarray],
    parameter_groups: Mapping[str, str],
) -> dict[str, np.ndarray]:
    """Average each key over the sites that trained its group, weighted by their example counts.

    ``counts[i]`` holds ``num-examples`` and ``num-examples-<modality>`` of site ``i`` (modality names
    are dynamic: ``image:t1`` for an image sequence; a shared multi-sequence encoder's group ``image`` is
    weighted by the sum of its sequences' counts, see :func:`modality_count`). A group no sampled site
    trained keeps its ``current`` value. With every modality at every site this is exactly FedAvg
    weighted by ``num-examples``.
    """
    out: dict[str, np.ndarray] = {}
    for key, reference in current.items():
        group = group_of_key(key, parameter_groups)
        weights = np.array([float(c.get(NUM_EXAMPLES, 0.0)) if group == SHARED_GROUP else modality_count(c, group)
                            for c in counts], dtype=np.float64)
        total = weights.sum()
        if total <= 0:
            out[key] = np.array(reference, copy=True)
            continue
        if not np.issubdtype(reference.dtype, np.floating):
            out[key] = np.array(updates[int(np.argmax(weights))][key], copy=True)  # e.g. integer counters
            continue
        acc = np.zeros(reference.shape, dtype=np.float64)
        scratch = np.empty(reference.shape, dtype=np.float64)  # one buffer per key, not two temporaries per site
        for update, weight in zip(updates, weights, strict=True):
            if weight > 0:
                np.multiply(update[key], weight / total, out=scratch, dtype=np.float64)
                acc += scratch
        out[key] = acc.astype(reference.dtype)
    return out


def check_update(update: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> str | None:
    """Why an update must not be averaged (missing key, shape/dtype change, NaN/inf), or None."""
    missing = sorted(set(current) - set(update))
    extra = sorted(set(update) - set(current))
    if missing or extra:
        return f"keys differ from the global model (missing {missing[:5]}, unexpected {extra[:5]})"
    for key, reference in current.items():
        value = update[key]
        if value.shape != reference.shape:
            return f"'{key}' has shape {value.shape}, the global model has {reference.shape}"
        if value.dtype != reference.dtype:
            return f"'{key}' has dtype {value.dtype}, the global model has {reference.dtype}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"'{key}' holds NaN or infinite values"
    return None


def _one_record_with_same_keys(contents: list[Any], kind: str, records: Callable[[Any], Mapping[str, Any]],
                               count_end: str) -> tuple[str, set[str]]:
    """The name and keys of the one ``kind`` record every reply must carry, or Flower's reason why not.

    Flower runs this check once for ArrayRecords and once for MetricRecords with the same wording except
    the end of its count message (``count_end``: ``"."`` or ``", but found more."``); the record name
    and keys are those of the first reply, as in Flower.
    """
    if any(len(records(c)) != 1 for c in contents):
        raise InconsistentMessageReplies(reason=f"Expected exactly one {kind} in replies{count_end} "
                                         "Skipping aggregation.")
    record_key = next(iter(records(contents[0]).keys()))
    all_keys = set(contents[0][record_key].keys())
    if any(set(c.get(record_key, {}).keys()) != all_keys for c in contents[1:]):
        raise InconsistentMessageReplies(reason=f"All {kind}s must have the same keys for aggregation. "
                                         "This condition wasn't met. Skipping aggregation.")
    return record_key, all_keys


def check_reply_consistency(contents: list[Any], weighted_by_key: str, check_arrayrecord: bool) -> None:
    """Raise Flower's ``InconsistentMessageReplies`` unless the replies can be aggregated together.

    The same checks, order and reasons as Flower 1.41's FedAvg: exactly one ArrayRecord (train) with the
    same keys everywhere, exactly one MetricRecord with the same keys everywhere, holding a scalar
    ``weighted_by_key``. Raising (not dropping) keeps Flower's behaviour: the ServerApp ends with its reason.
    """
    if check_arrayrecord:
        _one_record_with_same_keys(contents, "ArrayRecord", lambda c: c.array_records, ".")
    record_key, all_keys = _one_record_with_same_keys(contents, "MetricRecord", lambda c: c.metric_records,
                                                      ", but found more.")
    if weighted_by_key not in all_keys:
        raise InconsistentMessageReplies(reason=f"Missing required key `{weighted_by_key}` in the MetricRecord of "
                                         "reply messages. Cannot average ArrayRecords and MetricRecords. "
                                         "Skipping aggregation.")
    if any(isinstance(c[record_key][weighted_by_key], list) for c in contents):
        raise InconsistentMessageReplies(reason=f"Key `{weighted_by_key}` in the MetricRecord of reply messages "
                                         "must be a single value (int or float), but a list was found. "
                                         "Skipping aggregation.")


def check_and_log_replies(replies: Iterable[Message], *, is_train: bool, weighted_by_key: str,
                          validate: bool = True) -> tuple[list[Message], list[Message]]:
    """(replies with content, error replies), logged as Flower's FedAvg logs them; with ``validate`` the
    replies with content must pass :func:`check_reply_consistency`."""
    valid: list[Message] = []
    errors: list[Message] = []
    for msg in replies:
        (errors if msg.has_error() else valid).append(msg)
    if not valid and not errors:
        return [], []
    log(INFO, "%s: Received %s results and %s failures", "aggregate_train" if is_train else "aggregate_evaluate",
        len(valid), len(errors))
    for msg in errors:
        log(INFO, "\t> Received error in reply from node %d: %s", msg.metadata.src_node_id, msg.error.reason)
    if validate and valid:
        check_reply_consistency([m.content for m in valid], weighted_by_key, check_arrayrecord=is_train)
    return valid, errors


def site_of(message: Message) -> str:
    """The site name a reply carries (falls back to the node id)."""
    content = message.content
    if SITE_KEY in content.config_records:
        return str(content.config_records[SITE_KEY].get("site-id", message.metadata.src_node_id))
    return str(message.metadata.src_node_id)


class ModalityAwareFedAvg(FedAvg):
    """FedAvg whose parameter groups are averaged over the sites that have that modality.

    ``parameter_groups`` maps state_dict keys to ``image``/``clinical``/``omics`` (anything else is
    shared). The strategy also keeps, per round, each site's train and evaluate metrics and the
    sites whose replies were rejected, for the run's report.
    """

    def __init__(self, *, parameter_groups: Mapping[str, str] | None = None, **kwargs: Any):
        kwargs.setdefault("weighted_by_key", NUM_EXAMPLES)
        super().__init__(**kwargs)
        self.parameter_groups = dict(parameter_groups or {})
        # Client-level DP (server/privacy.py) needs every accepted update to weigh the same.
        self.uniform_weights = False
        self.private_keys: frozenset[str] = frozenset()  # kept at the sites, never averaged (build_strategy)
        self._global: dict[str, np.ndarray] | None = None
        # The ArrayRecord aggregate_train last returned and the arrays it was made from: the round loop hands
        # that very record back to configure_train/evaluate, which then skip decoding it tensor by tensor.
        self._produced: tuple[ArrayRecord, dict[str, np.ndarray]] | None = None
        self.site_metrics: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = self._as_numpy(arrays)
        packed, config = self._packed(self._global, config)
        return super().configure_train(server_round, packed, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        packed, config = self._packed(self._as_numpy(arrays), config)
        return super().configure_evaluate(server_round, packed, config, grid)

    def _as_numpy(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """``arrays`` as named numpy arrays; the ones :meth:`_produce` kept when it is that same record
        (identity, not equality: any other record, e.g. noised by client-level DP, is decoded)."""
        if self._produced is not None and arrays is self._produced[0]:
            return self._produced[1]
        return arrays_to_numpy(arrays)

    def _produce(self, new: dict[str, np.ndarray]) -> ArrayRecord:
        """The new global model as the ArrayRecord Flower's API returns, remembered with its arrays."""
        record = numpy_to_arrays(new)
        self._produced = (record, new)
        return record

    def _packed(self, arrays: Mapping[str, np.ndarray], config: ConfigRecord) -> tuple[ArrayRecord, ConfigRecord]:
        """The global model in the packed wire format (common/packing.py) and the config naming its layout."""
        layout = PackLayout.of(arrays, self.parameter_groups)
        return layout.pack(arrays), ConfigRecord({**dict(config), LAYOUT_KEY: layout.sha256})

    @staticmethod
    def _reply_update(msg: Message, layout: PackLayout) -> dict[str, np.ndarray]:
        """A train reply's update as named tensors: unpacked when the site sent the packed format (its
        layout must be ``layout``, the shared global model's), as sent otherwise (per-tensor)."""
        record = next(iter(msg.content.array_records.values()))
        sent = sent_layout(msg.content.config_records.get(SITE_KEY))
        if sent is None:
            return arrays_to_numpy(record)
        return layout.unpack(record, sent)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                self._reject(server_round, "train", site_of(msg) if msg.has_content() else str(
                    msg.metadata.src_node_id), msg.error.reason)
        valid, _ = check_and_log_replies(replies, is_train=True, weighted_by_key=self.weighted_by_key)
        if not valid or self._global is None:
            return None, None
        accepted, updates, counts = [], [], []
        # Replies arrive in whatever order sites finish; summing in a fixed order makes a round's result
        # bit-for-bit reproducible, which exact resume relies on.
        shared = {k: v for k, v in self._global.items() if k not in self.private_keys}
        layout = PackLayout.of(shared, self.parameter_groups)  # what a site that packs its reply must use
        for msg in sorted(valid, key=site_of):
            try:
                update = self._reply_update(msg, layout)
            except LayoutMismatch as err:
                self._reject(server_round, "train", site_of(msg), str(err))
                continue
            update = {k: v for k, v in update.items() if k not in self.private_keys}
            problem = check_update(update, shared)
            if problem is not None:
                self._reject(server_round, "train", site_of(msg), problem)
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            accepted.append(msg)
            updates.append(update)
            counts.append(self._uniform_counts() if self.uniform_weights else dict(metrics))
            self.site_metrics.append({"round": server_round, "phase": "train", "site": site_of(msg),
                                      **dict(metrics)})
        if not accepted:
            return None, None
        averaged = modality_weighted_average(updates, counts, shared, self.parameter_groups)
        # private keys keep the global (initial) values, in the global model's key order
        averaged = {k: averaged[k] if k in averaged else np.array(v, copy=True) for k, v in self._global.items()}
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        return self._produce(averaged), metrics

    def _uniform_counts(self) -> dict[str, float]:
        """Weight 1 for every group, the fixed modalities and this model's own (e.g. ``image:t1``)."""
        groups = {g for g in self.parameter_groups.values() if is_modality(g)}
        return {k: 1.0 for k in (NUM_EXAMPLES, *MODALITY_COUNT_KEYS.values(), *map(modality_count_key, groups))}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        valid, _ = check_and_log_replies(replies, is_train=False, weighted_by_key=self.weighted_by_key,
                                         validate=False)
        for msg in valid:
            metrics = next(iter(msg.content.metric_records.values()))
            self.site_metrics.append({"round": server_round, "phase": "evaluate", "site": site_of(msg),
                                      **dict(metrics)})
        if not valid:
            return None
        # Not FedAvg's version: it insists every site reports the same metric keys, but a site whose
        # test split has no comparable pair has no C-index that round.
        return self.evaluate_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)

    def _reject(self, server_round: int, phase: str, site: str, reason: str) -> None:
        log(WARNING, "round %s: %s reply from site %s rejected: %s", server_round, phase, site, reason)
        self.rejected.append({"round": server_round, "phase": phase, "site": site, "reason": reason})

    def state(self) -> dict[str, Any]:
        """What must be checkpointed for an exact resume (FedAdam adds its moments)."""
        return {"site_metrics": self.site_metrics, "rejected": self.rejected}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.site_metrics = list(state.get("site_metrics", []))
        self.rejected = list(state.get("rejected", []))


class ModalityAwareFedProx(FedProx, ModalityAwareFedAvg):
    """FedProx (sends ``proximal-mu`` to sites) with modality-aware averaging."""

    def __init__(self, *, parameter_groups: Mapping[str, str], **kwargs: Any):
        super().__init__(**kwargs)  # FedProx's __init__ does not forward unknown keywords
        self.parameter_groups = dict(parameter_groups)


class ModalityAwareFedAdam(FedAdam, ModalityAwareFedAvg):
    """FedAdam (server-side Adam on the averaged update) with modality-aware averaging.

    Flower's class gives the constructor (``eta``, ``eta_l``, ``beta_1``, ``beta_2``, ``tau``) and the
    configure steps; the Adam step and its moments (:attr:`moments`) are ours, so checkpoints never hold
    Flower's private state and an upgrade cannot change the step silently.
    """

    def __init__(self, *, parameter_groups: Mapping[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.parameter_groups = dict(parameter_groups)
        # First and second moments per key (Flower's m_t / v_t); None until the first aggregated round.
        self.moments: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The modality-aware average, then Flower 1.41's FedAdam step, returned in the global model's dtypes.

        The step is computed in float64 like Flower's; handing that back would make the next round's float32
        updates fail the dtype check (and double the bytes sent), so every round after the first was
        rejected before this cast.
        """
        arrays, metrics = ModalityAwareFedAvg.aggregate_train(self, server_round, replies)
        if arrays is None or self._global is None:
            return arrays, metrics
        stepped = adam_step(self._global, self._as_numpy(arrays), self.moments, server_round,
                            eta=self.eta, beta_1=self.beta_1, beta_2=self.beta_2, tau=self.tau)
        new, self.moments = stepped
        reference = {k: np.asarray(v).dtype for k, v in self._global.items()}
        return self._produce({k: np.asarray(v).astype(reference.get(k, np.asarray(v).dtype), copy=False)
                              for k, v in new.items()}), metrics

    def state(self) -> dict[str, Any]:
        state = super().state()
        # Key names kept from checkpoints written when these were Flower's attributes.
        state["m_t"], state["v_t"] = self.moments if self.moments is not None else (None, None)
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        if state.get("m_t") is not None:
            self.moments = (dict(state["m_t"]), dict(state["v_t"]))


def adam_step(current: Mapping[str, np.ndarray], aggregated: Mapping[str, np.ndarray],
              moments: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None, server_round: int, *,
              eta: float, beta_1: float, beta_2: float, tau: float,
              ) -> tuple[dict[str, np.ndarray], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(new arrays, (m, v)): FedAdam's server step on the pseudo-gradient ``aggregated - current``.

    Reddi et al. 2021 with the bias-corrected step of Kingma & Ba, exactly as Flower 1.41's FedAdam
    computes it (same operations in the same order, so results are bit-identical).
    """
    if set(aggregated) != set(current):
        raise ValueError(f"aggregated keys {sorted(aggregated)[:5]} differ from the global model's "
                         f"{sorted(current)[:5]}")
    delta = {k: x - current[k] for k, x in aggregated.items()}
    m_prev, v_prev = moments if moments else ({}, {})
    if not m_prev:
        m_prev = {k: np.zeros_like(v) for k, v in aggregated.items()}
    m = {k: beta_1 * v + (1 - beta_1) * delta[k] for k, v in m_prev.items()}
    if not v_prev:
        v_prev = {k: np.zeros_like(v) for k, v in aggregated.items()}
    v = {k: beta_2 * x + (1 - beta_2) * (delta[k] ** 2) for k, x in v_prev.items()}
    eta_norm = eta * np.sqrt(1 - np.power(beta_2, server_round + 1.0)) / (1 - np.power(beta_1, server_round + 1.0))
    new = {k: x + eta_norm * m[k] / (np.sqrt(v[k]) + tau) for k, x in current.items()}
    return new, (m, v)


STRATEGIES: dict[str, type[ModalityAwareFedAvg]] = {
    "fedavg": ModalityAwareFedAvg,
    "fedprox": ModalityAwareFedProx,
    "fedadam": ModalityAwareFedAdam,
}


def build_strategy(name: str, parameter_groups: Mapping[str, str], *, min_sites: int, fraction_train: float = 1.0,
                   fraction_evaluate: float = 1.0, proximal_mu: float = 0.01, server_lr: float = 0.01,
                   evaluate_metrics_aggr_fn: Callable | None = None,
                   train_metrics_aggr_fn: Callable | None = None,
                   private_keys: Iterable[str] = ()) -> ModalityAwareFedAvg:
    """The one way the server builds a strategy; ``name`` is a key of :data:`STRATEGIES`.

    ``private_keys``: state_dict keys the sites keep (``private-parts``); their replies lack them.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    kwargs: dict[str, Any] = dict(
        parameter_groups=parameter_groups, fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_sites, min_evaluate_nodes=min_sites, min_available_nodes=min_sites,
    )
    if evaluate_metrics_aggr_fn is not None:
        kwargs["evaluate_metrics_aggr_fn"] = evaluate_metrics_aggr_fn
    if train_metrics_aggr_fn is not None:
        kwargs["train_metrics_aggr_fn"] = train_metrics_aggr_fn
    if name == "fedprox":
        kwargs["proximal_mu"] = proximal_mu
    if name == "fedadam":
        kwargs["eta"] = server_lr
    strategy = STRATEGIES[name](**kwargs)
    strategy.private_keys = frozenset(private_keys)
    return strategy
