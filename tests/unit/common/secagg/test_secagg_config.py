"""Round configuration: refuses unsafe settings, and every message survives Flower's record serde."""

from __future__ import annotations

import numpy as np
import pytest

from fedfusion.common.flower_adapter import roundtrip
from fedfusion.common.secagg.config import SecAggConfig, default_threshold
from fedfusion.common.secagg.layout import VectorLayout
from fedfusion.common.secagg.messages import (
    AdvertisedKeys,
    UnmaskReply,
    UnmaskRequest,
    bundles_from_dict,
    bundles_to_dict,
)

LAYOUT = VectorLayout({"w": (3,)}, {"w": "shared"})
BIG_IDS = [2**64 - 1, 2**63 + 5, 17]  # Flower node ids are unsigned 64-bit


def test_two_sites_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="subtract its own update") as caught:
        SecAggConfig.create([1, 2], LAYOUT, clip=1.0)

    assert "allow_two_sites=True" in str(caught.value)


def test_two_sites_are_accepted_with_the_explicit_override() -> None:
    config = SecAggConfig.create([1, 2], LAYOUT, clip=1.0, allow_two_sites=True)

    assert (config.degree, config.threshold, config.min_survivors) == (1, 2, 2)


def test_one_site_is_refused_even_with_the_override() -> None:
    with pytest.raises(ValueError, match="at least 3 sites"):
        SecAggConfig.create([1], LAYOUT, clip=1.0, allow_two_sites=True)


@pytest.mark.parametrize(("degree", "expected"), [(2, 2), (4, 4), (9, 7), (18, 13)])
def test_default_threshold_is_two_thirds_and_a_strict_majority(degree: int, expected: int) -> None:
    threshold = default_threshold(degree)

    assert threshold == expected
    assert 2 * threshold > degree + 1


@pytest.mark.parametrize("threshold", [2, 6])
def test_threshold_outside_strict_majority_of_holders_is_refused(threshold: int) -> None:
    with pytest.raises(ValueError, match="strict majority"):
        SecAggConfig.create(range(1, 6), LAYOUT, clip=1.0, threshold=threshold)  # 5 holders: 3..5


def test_modulus_too_small_for_the_sites_is_refused_at_the_server() -> None:
    with pytest.raises(ValueError, match="needs a 33-bit modulus"):
        SecAggConfig.create(range(1, 11), LAYOUT, clip=1.0, bits=32, value_bits=29)


def test_config_round_trips_through_a_flower_config_record() -> None:
    from flwr.app import ConfigRecord, RecordDict

    config = SecAggConfig.create(BIG_IDS, LAYOUT, clip=0.5, weight_bound=5000.0, bits=40, value_bits=20)

    record = roundtrip(RecordDict({"secagg": ConfigRecord(config.to_record())}))["secagg"]

    assert isinstance(record, ConfigRecord)

    assert SecAggConfig.from_record(record) == config


def test_messages_round_trip_through_flower_records() -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    def through(values: dict) -> ConfigRecord:
        """``values`` as a ConfigRecord after Flower's wire format (to proto and back, inside a RecordDict)."""
        return roundtrip(RecordDict({"c": ConfigRecord(values)}))["c"]

    keys = AdvertisedKeys(b"c" * 32, b"s" * 32)
    request = UnmaskRequest((BIG_IDS[0], 3), (BIG_IDS[1],))
    reply = UnmaskReply({BIG_IDS[0]: b"b-share"}, {BIG_IDS[1]: b"s-share"})
    bundles = {BIG_IDS[0]: b"ciphertext"}
    vector = np.arange(7, dtype=np.uint32)

    arrays = roundtrip(RecordDict({"a": ArrayRecord({"masked": Array(vector)})}))["a"]

    assert AdvertisedKeys.from_dict(through(keys.to_dict())) == keys
    assert UnmaskRequest.from_dict(through(request.to_dict())) == request
    assert UnmaskReply.from_dict(through(reply.to_dict())) == reply
    assert bundles_from_dict(through(bundles_to_dict(bundles))) == bundles
    assert np.array_equal(arrays["masked"].numpy(), vector)
    assert arrays["masked"].numpy().dtype == np.uint32
