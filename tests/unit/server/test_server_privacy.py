"""Server side of DP: refusals are taken out of a round and recorded; client-level DP averages clipped
updates uniformly and adds noise scaled to the updates it actually averaged."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedfusion.common.records import ARRAYS_KEY, METRICS_KEY, SITE_KEY, numpy_to_arrays
from fedfusion.server.privacy import ClientLevelDP, split_refusals
from fedfusion.server.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime


GROUPS = {"encoders.omics.w": "omics", "fusion.w": "fusion"}


def _reply(site: str, content: dict) -> Message:
    request = Message(RecordDict({}), dst_node_id=hash(site) % 1000 + 1, message_type="train")
    return Message(RecordDict(content), reply_to=request)


def _update(site: str, value: float, n: int) -> Message:
    arrays = {key: np.full((2, 2), value, dtype=np.float32) for key in GROUPS}
    counts = {"num-examples": n, "num-examples-omics": n, "num-examples-clinical": n, "epsilon": 0.5}
    return _reply(
        site,
        {
            ARRAYS_KEY: numpy_to_arrays(arrays),
            METRICS_KEY: MetricRecord(counts),
            SITE_KEY: ConfigRecord({"site-id": site}),
        },
    )


def test_refusals_are_split_out_with_reason_and_epsilon() -> None:
    refusal = _reply(
        "A",
        {
            METRICS_KEY: MetricRecord({"epsilon": 2.9}),
            SITE_KEY: ConfigRecord({"site-id": "A", "refused": "study 's': past the budget"}),
        },
    )
    refusals, others = split_refusals(4, [refusal, _update("B", 1.0, 10)])
    assert refusals == [{"round": 4, "site": "A", "reason": "study 's': past the budget", "epsilon": 2.9}]
    assert [m.content[SITE_KEY]["site-id"] for m in others] == ["B"]


def test_client_level_dp_averages_uniformly_then_adds_scaled_noise() -> None:
    inner = build_strategy("fedavg", GROUPS, min_sites=1)
    inner._global = {key: np.zeros((2, 2), dtype=np.float32) for key in GROUPS}  # set by configure_train
    exact = ClientLevelDP(inner, noise_multiplier=0.0, clipping_norm=1.0)
    arrays, _ = exact.aggregate_train(1, [_update("A", 1.0, 10), _update("B", 3.0, 90)])
    # example-weighted FedAvg would give 2.8; each clipped update must weigh the same
    assert np.allclose(arrays["fusion.w"].numpy(), 2.0) and exact.num_sampled_clients == 2
    assert exact.site_metrics[0]["site"] == "A" and exact.releases == 1  # the inner strategy's reports pass through

    noisy_inner = build_strategy("fedavg", GROUPS, min_sites=1)
    noisy_inner._global = inner._global
    noisy = ClientLevelDP(noisy_inner, noise_multiplier=1.0, clipping_norm=1.0)
    arrays, _ = noisy.aggregate_train(1, [_update("A", 1.0, 10), _update("B", 3.0, 90)])
    assert not np.allclose(arrays["fusion.w"].numpy(), 2.0)
    first = noisy.epsilon()
    noisy.aggregate_train(2, [_update("A", 1.0, 10)])
    assert 0 < first < noisy.epsilon() and noisy.state()["client_dp_releases"] == 2
