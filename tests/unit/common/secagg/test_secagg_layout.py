"""Layout and weighted encoding: weights and w * x in one vector; groups a site lacks are zeros."""

from __future__ import annotations

import numpy as np
import pytest

from fedfusion.common.secagg.layout import VectorLayout, WeightedEncoder

SHAPES = {"image.w": (4, 3), "clinical.w": (5,), "head.b": (2,)}
GROUPS = {"image.w": "image", "clinical.w": "clinical", "head.b": "shared"}


def _encoder(sites: int = 3, bits: int = 64) -> WeightedEncoder:
    return WeightedEncoder(VectorLayout(SHAPES, GROUPS), clip=2.0, weight_bound=1000.0, num_sites=sites, bits=bits)


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-2, 2, shape) for name, shape in SHAPES.items()}


def test_layout_puts_group_weights_first_then_sorted_parameters() -> None:
    layout = VectorLayout(SHAPES, GROUPS)

    assert layout.groups == ("clinical", "image", "shared")
    assert [e.name for e in layout.entries] == ["clinical.w", "head.b", "image.w"]
    assert layout.entries[0].offset == 3
    assert layout.length == 3 + 5 + 2 + 12


def test_layout_json_round_trips_and_digest_tracks_shapes() -> None:
    layout = VectorLayout(SHAPES, GROUPS)

    assert VectorLayout.from_json(layout.to_json()).digest() == layout.digest()
    assert VectorLayout({**SHAPES, "head.b": (3,)}, GROUPS).digest() != layout.digest()
    assert VectorLayout(SHAPES, {**GROUPS, "head.b": "image"}).digest() != layout.digest()


def test_one_site_decodes_to_weighted_update_and_weights() -> None:
    encoder = _encoder()
    update = _update()
    weights = {"image": 120.0, "clinical": 80.0, "shared": 200.0}

    sums, weight_sums = encoder.decode_sum(encoder.encode(update, weights).values, 1)

    assert weight_sums == pytest.approx(weights, abs=1e-6)
    for name, group in GROUPS.items():
        assert np.allclose(sums[name], weights[group] * update[name], atol=1e-6)


def test_a_group_the_site_lacks_is_exact_zeros_and_may_be_absent() -> None:
    encoder = _encoder()
    update = {k: v for k, v in _update().items() if k != "image.w"}

    sums, weight_sums = encoder.decode_sum(encoder.encode(update, {"clinical": 5.0, "shared": 5.0}).values, 1)

    assert weight_sums["image"] == 0.0
    assert not sums["image.w"].any()


def test_clipped_entries_are_counted() -> None:
    update = _update()
    update["head.b"] = np.array([3.0, -9.0])

    assert _encoder().encode(update, {"shared": 1.0, "image": 1.0, "clinical": 1.0}).clipped == 2


@pytest.mark.parametrize(
    ("update", "weights", "message"),
    [
        ({}, {"image": 1.0}, "missing although group 'image' has a weight"),
        ({"image.w": np.zeros((3, 4))}, {"image": 1.0}, "has shape"),
        ({"other": np.zeros(1)}, {}, "not in the layout"),
        ({}, {"omics": 1.0}, "groups not in the layout"),
        ({}, {"shared": 1001.0}, "exceeds weight_bound"),
        ({}, {"shared": -1.0}, ">= 0"),
        ({"head.b": np.array([0.0, np.inf])}, {"shared": 1.0}, "NaN or infinite"),
    ],
)
def test_bad_updates_and_weights_are_refused(update: dict, weights: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _encoder().encode(update, weights)


def test_layout_refuses_parameters_without_a_group() -> None:
    with pytest.raises(ValueError, match="without a group"):
        VectorLayout(SHAPES, {"image.w": "image"})
