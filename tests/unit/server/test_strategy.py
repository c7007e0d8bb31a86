"""Modality-aware FedAvg: plain FedAvg when every site has every modality; a site without a
modality does not touch that modality's encoder; bad updates are rejected, not averaged."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedfusion.common.records import ARRAYS_KEY, METRICS_KEY, SITE_KEY, arrays_to_numpy, numpy_to_arrays
from fedfusion.server.strategy import build_strategy, check_update, modality_weighted_average

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime


GROUPS = {"encoders.omics.w": "omics", "encoders.image.w": "image", "fusion.w": "fusion"}


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {key: rng.normal(size=(3, 4)).astype(np.float32) for key in GROUPS}


def _counts(n: int, image: int, omics: int) -> dict[str, float]:
    return {"num-examples": n, "num-examples-image": image, "num-examples-omics": omics,
            "num-examples-clinical": n}


def _reply(update: dict[str, np.ndarray], counts: dict[str, float], site: str) -> Message:
    request = Message(RecordDict({ARRAYS_KEY: numpy_to_arrays(update)}), dst_node_id=hash(site) % 1000 + 1,
                      message_type="train")
    content = RecordDict({ARRAYS_KEY: numpy_to_arrays(update), METRICS_KEY: MetricRecord(counts),
                          SITE_KEY: ConfigRecord({"site-id": site})})
    return Message(content, reply_to=request)


def test_all_modalities_present_equals_plain_fedavg() -> None:
    rng = np.random.default_rng(0)
    current = _weights(rng)
    updates = [_weights(rng) for _ in range(3)]
    counts = [_counts(n, n, n) for n in (10, 25, 65)]
    ours = modality_weighted_average(updates, counts, current, GROUPS)
    records = [RecordDict({"a": numpy_to_arrays(u), "m": MetricRecord(c)})
               for u, c in zip(updates, counts, strict=True)]
    flower = arrays_to_numpy(aggregate_arrayrecords(records, "num-examples"))
    for key in GROUPS:
        np.testing.assert_allclose(ours[key], flower[key], atol=1e-6)


def test_site_without_omics_leaves_omics_encoder_to_the_others() -> None:
    rng = np.random.default_rng(1)
    current = _weights(rng)
    updates = [_weights(rng) for _ in range(3)]
    counts = [_counts(10, 10, 10), _counts(30, 30, 0), _counts(20, 5, 20)]
    ours = modality_weighted_average(updates, counts, current, GROUPS)
    expected_omics = (10 * updates[0]["encoders.omics.w"] + 20 * updates[2]["encoders.omics.w"]) / 30
    np.testing.assert_allclose(ours["encoders.omics.w"], expected_omics, atol=1e-6)
    expected_image = (10 * updates[0]["encoders.image.w"] + 30 * updates[1]["encoders.image.w"]
                      + 5 * updates[2]["encoders.image.w"]) / 45
    np.testing.assert_allclose(ours["encoders.image.w"], expected_image, atol=1e-6)
    expected_shared = (10 * updates[0]["fusion.w"] + 30 * updates[1]["fusion.w"] + 20 * updates[2]["fusion.w"]) / 60
    np.testing.assert_allclose(ours["fusion.w"], expected_shared, atol=1e-6)


def test_group_nobody_trained_keeps_global_value() -> None:
    rng = np.random.default_rng(2)
    current = _weights(rng)
    updates = [_weights(rng) for _ in range(2)]
    ours = modality_weighted_average(updates, [_counts(5, 5, 0), _counts(7, 7, 0)], current, GROUPS)
    np.testing.assert_array_equal(ours["encoders.omics.w"], current["encoders.omics.w"])


def test_check_update_names_the_problem() -> None:
    current = {"w": np.zeros((2, 2), np.float32)}
    assert check_update({"w": np.full((2, 2), np.nan, np.float32)}, current) == "'w' holds NaN or infinite values"
    assert "shape" in check_update({"w": np.zeros((3, 2), np.float32)}, current)
    assert "dtype" in check_update({"w": np.zeros((2, 2), np.float64)}, current)
    assert "missing" in check_update({}, current)
    assert check_update({"w": np.ones((2, 2), np.float32)}, current) is None


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam"])
def test_strategy_rejects_nan_update_and_averages_the_rest(name: str) -> None:
    rng = np.random.default_rng(3)
    current = _weights(rng)
    strategy = build_strategy(name, GROUPS, min_sites=2)
    strategy._global = current
    if name == "fedadam":
        strategy.current_arrays = current
    good = [_weights(rng), _weights(rng)]
    bad = {k: np.full_like(v, np.nan) for k, v in current.items()}
    replies = [_reply(good[0], _counts(10, 10, 10), "A"), _reply(bad, _counts(50, 50, 50), "B"),
               _reply(good[1], _counts(30, 30, 0), "C")]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert [r["site"] for r in strategy.rejected] == ["B"]
    result = arrays_to_numpy(arrays)
    assert all(np.isfinite(v).all() for v in result.values())
    if name != "fedadam":  # FedAdam moves by a server step; FedAvg/FedProx land on the weighted mean
        np.testing.assert_allclose(result["encoders.omics.w"], good[0]["encoders.omics.w"], atol=1e-6)
        np.testing.assert_allclose(result["fusion.w"], (10 * good[0]["fusion.w"] + 30 * good[1]["fusion.w"]) / 40,
                                   atol=1e-6)
    assert {m["site"] for m in strategy.site_metrics} == {"A", "C"}
    assert isinstance(arrays, ArrayRecord) and metrics is not None


def test_round_metrics_average_scores_and_sum_counts() -> None:
    from fedfusion.server.federation import weighted_metric_mean

    sites = [{"num-examples": 10, "c_index": 0.6, "n": 10, "events": 4},
             {"num-examples": 30, "c_index": 0.8, "n": 30, "events": 9},
             {"num-examples": 20, "n": 20, "events": 0}]  # no comparable pair: no C-index
    merged = weighted_metric_mean(sites)
    assert merged["c_index"] == pytest.approx((10 * 0.6 + 30 * 0.8) / 40)
    assert (merged["n"], merged["events"], merged["num-examples"]) == (60, 13, 60)


def test_fedadam_keeps_the_models_dtypes_so_later_rounds_are_accepted() -> None:
    rng = np.random.default_rng(5)
    current = {k: v.astype(np.float32) for k, v in _weights(rng).items()}
    strategy = build_strategy("fedadam", GROUPS, min_sites=2)
    for server_round in (1, 2, 3):
        strategy._global = current
        strategy.current_arrays = current
        replies = [_reply({k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in current.items()},
                          _counts(10, 10, 10), site) for site in ("A", "C")]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays is not None, strategy.rejected
        current = arrays_to_numpy(arrays)
        assert {v.dtype for v in current.values()} == {np.dtype(np.float32)}
    assert strategy.rejected == []
