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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.supercore import log

from fedfusion.common.config import is_modality
from fedfusion.common.records import (
    MODALITY_COUNT_KEYS,
    NUM_EXAMPLES,
    SITE_KEY,
    arrays_to_numpy,
    modality_count,
    modality_count_key,
    numpy_to_arrays,
)

SHARED_GROUP = "shared"


def group_of_key(name: str, parameter_groups: Mapping[str, str]) -> str:
    """Group of a state_dict key: a modality name, or ``shared`` (fusion, heads, buffers)."""
    group = parameter_groups.get(name, SHARED_GROUP)
    return group if is_modality(group) else SHARED_GROUP


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
        for update, weight in zip(updates, weights, strict=True):
            if weight > 0:
                acc += update[key].astype(np.float64) * (weight / total)
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
        self._global: dict[str, np.ndarray] | None = None
        self.site_metrics: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays_to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                self._reject(server_round, "train", site_of(msg) if msg.has_content() else str(
                    msg.metadata.src_node_id), msg.error.reason)
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self._global is None:
            return None, None
        accepted, updates, counts = [], [], []
        # Replies arrive in whatever order sites finish; summing in a fixed order makes a round's result
        # bit-for-bit reproducible, which exact resume relies on.
        for msg in sorted(valid, key=site_of):
            update = arrays_to_numpy(next(iter(msg.content.array_records.values())))
            problem = check_update(update, self._global)
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
        averaged = modality_weighted_average(updates, counts, self._global, self.parameter_groups)
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        return numpy_to_arrays(averaged), metrics

    def _uniform_counts(self) -> dict[str, float]:
        """Weight 1 for every group, the fixed modalities and this model's own (e.g. ``image:t1``)."""
        groups = {g for g in self.parameter_groups.values() if is_modality(g)}
        return {k: 1.0 for k in (NUM_EXAMPLES, *MODALITY_COUNT_KEYS.values(), *map(modality_count_key, groups))}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=False, validate=False)
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
    """FedAdam (server-side Adam on the averaged update) with modality-aware averaging."""

    def __init__(self, *, parameter_groups: Mapping[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.parameter_groups = dict(parameter_groups)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAdam step, returned in the global model's dtypes.

        Flower computes the Adam step in float64; handing that back would make the next round's float32
        updates fail the dtype check (and double the bytes sent), so every round after the first was
        rejected before this cast.
        """
        reference = {k: np.asarray(v).dtype for k, v in (self._global or {}).items()}
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or not reference:
            return arrays, metrics
        return ArrayRecord({k: Array(np.asarray(a.numpy()).astype(reference.get(k, a.numpy().dtype), copy=False))
                            for k, a in arrays.items()}), metrics

    def state(self) -> dict[str, Any]:
        state = super().state()
        state["m_t"] = getattr(self, "m_t", None)
        state["v_t"] = getattr(self, "v_t", None)
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        if state.get("m_t") is not None:
            self.m_t = state["m_t"]
            self.v_t = state["v_t"]


STRATEGIES: dict[str, type[ModalityAwareFedAvg]] = {
    "fedavg": ModalityAwareFedAvg,
    "fedprox": ModalityAwareFedProx,
    "fedadam": ModalityAwareFedAdam,
}


def build_strategy(name: str, parameter_groups: Mapping[str, str], *, min_sites: int, fraction_train: float = 1.0,
                   fraction_evaluate: float = 1.0, proximal_mu: float = 0.01, server_lr: float = 0.01,
                   evaluate_metrics_aggr_fn: Callable | None = None,
                   train_metrics_aggr_fn: Callable | None = None) -> ModalityAwareFedAvg:
    """The one way the server builds a strategy; ``name`` is a key of :data:`STRATEGIES`."""
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
    return STRATEGIES[name](**kwargs)
