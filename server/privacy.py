"""The coordinator's side of differential privacy: refusals from sites, and client-level (central) DP.

Sample-level DP is enforced at the sites (their policy and ledger); the server only records what
they report: each train reply's ε, and each refusal (a site whose policy or budget does not allow
the round answers with its reason instead of an update). :func:`split_refusals` takes refusals
out of a round's replies before the strategy aggregates, so they are neither averaged nor counted
as failures.

Client-level DP (``dp-mode = "client"``) is Flower's ``DifferentialPrivacyClientSideFixedClipping``
around our strategy: sites clip their update to ``client-dp-clipping-norm`` (``fixedclipping_mod``),
the server adds Gaussian noise of ``client-dp-noise-multiplier`` × norm / number of updates to the
average. :class:`ClientLevelDP` adds what our round loop needs: the inner strategy's reports and
checkpoint state, noise scaled to the updates actually averaged, uniform weights, and the ε of
the releases so far (RDP, no sampling amplification: sites are not Poisson-sampled).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from fedfusion.common.flower_adapter import flower_log
from fedfusion.common.records import EPSILON_KEY, METRICS_KEY, refusal_reason
from fedfusion.server.strategy import ModalityAwareFedAvg, site_of


def add_gaussian_noise(arrays: ArrayRecord, stdv: float) -> ArrayRecord:
    """``arrays`` plus N(0, stdv²) noise per element, each array keeping its dtype.

    Our own copy of Flower 1.41's central-DP noise (``np.random.normal`` drawn array by array in key order,
    cast to the array's dtype, then added), so the same NumPy seed gives the same release: the Gaussian
    mechanism is the privacy guarantee, and a private Flower method could change it in any release.
    """
    noised = {}
    for key, array in arrays.items():
        values = np.array(array.numpy(), copy=True)
        values += np.random.normal(0, stdv, values.shape).astype(values.dtype)
        noised[key] = Array(np.asarray(values))
    return ArrayRecord(noised)


def split_refusals(server_round: int, replies: Iterable[Message]) -> tuple[list[dict[str, Any]], list[Message]]:
    """(refusal rows ``{round, site, reason, epsilon?}``, the other replies) of one round."""
    refusals: list[dict[str, Any]] = []
    others: list[Message] = []
    for msg in replies:
        reason = refusal_reason(msg)
        if reason is None:
            others.append(msg)
            continue
        row: dict[str, Any] = {"round": server_round, "site": site_of(msg), "reason": reason}
        metrics = msg.content.metric_records.get(METRICS_KEY)
        if metrics is not None and EPSILON_KEY in metrics:
            row[EPSILON_KEY] = float(metrics[EPSILON_KEY])
        refusals.append(row)
    return refusals, others


class ClientLevelDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper, fitted to our round loop.

    - Every accepted update weighs the same: the noise is calibrated to a uniform average of
      clipped updates (sensitivity norm / n); example-weighted averaging would let one large site
      move the average by more than that.
    - The noise divides by the number of updates actually averaged (replies that failed or were
      rejected do not count), never by the number asked.
    - One failed site does not void the round (Flower's wrapper skips aggregation on any error).
    """

    def __init__(
        self, strategy: ModalityAwareFedAvg, noise_multiplier: float, clipping_norm: float, delta: float = 1e-5
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients=1)
        strategy.uniform_weights = True
        self.delta = delta
        self.releases = 0

    def __getattr__(self, name: str) -> Any:
        # site_metrics, rejected, parameter_groups...: the inner strategy's (only reached when missing here)
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        accepted = sum(1 for m in self.strategy.site_metrics if m["round"] == server_round and m["phase"] == "train")
        if arrays is None or accepted == 0:
            return arrays, metrics
        self.num_sampled_clients = accepted
        stdv = float(self.noise_multiplier * self.clipping_norm / accepted)  # sensitivity clip / n, times σ
        arrays = add_gaussian_noise(arrays, stdv)
        flower_log(INFO, "aggregate_fit: central DP noise with %.4f stdev added", stdv)
        self.releases += 1
        return arrays, metrics

    def epsilon(self) -> float:
        """Client-level ε after the noised rounds so far, at ``delta`` (every site counted every round)."""
        from fedfusion.common.privacy import epsilon_of

        return epsilon_of([(self.noise_multiplier, 1.0, self.releases)], self.delta, "rdp")

    def state(self) -> dict[str, Any]:
        return {**self.strategy.state(), "client_dp_releases": self.releases}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.strategy.load_state(state)
        self.releases = int(state.get("client_dp_releases", 0))
