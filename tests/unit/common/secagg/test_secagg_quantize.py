"""Fixed-point codec: round trip within half a step, sums of n sites never wrap, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfusion.common.secagg.masking import reduce
from fedfusion.common.secagg.quantize import FixedPointCodec, required_bits

CODECS = st.tuples(
    st.floats(1e-3, 1e3),  # clip
    st.integers(1, 60),  # sites
    st.sampled_from([16, 24, 32, 48, 64]),  # modulus bits
)


@settings(max_examples=80, deadline=None)
@given(CODECS, st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=40))
def test_round_trip_error_is_at_most_half_a_step(codec_args: tuple[float, int, int], unit: list[float]) -> None:
    clip, sites, bits = codec_args
    codec = FixedPointCodec(-clip, clip, sites, bits)
    values = np.array(unit) * clip

    result = codec.quantize(values)
    error = np.abs(codec.dequantize(result.values) - values)

    assert result.clipped == 0
    assert error.max() <= codec.step / 2 * (1 + 1e-6) + 4 * np.finfo(float).eps * clip


@settings(max_examples=60, deadline=None)
@given(CODECS, st.data())
def test_sum_of_n_sites_never_wraps_even_at_the_extremes(
    codec_args: tuple[float, int, int], data: st.DataObject
) -> None:
    clip, sites, bits = codec_args
    codec = FixedPointCodec(-clip, clip, sites, bits)
    signs = np.array(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=sites, max_size=sites)))
    values = signs[:, None] * clip * np.ones((sites, 3))

    total = np.zeros(3, dtype=codec.dtype)
    for row in values:
        total += codec.quantize(row).values
    decoded = codec.dequantize_sum(reduce(total, bits), sites)

    assert sites * codec.levels < 2**bits
    assert np.allclose(decoded, values.sum(axis=0), rtol=0, atol=sites * codec.step / 2 + 1e-9 * sites * clip)


def test_zero_is_encoded_exactly_so_a_missing_group_adds_nothing() -> None:
    codec = FixedPointCodec(-1.0, 1.0, 7, 32)

    assert codec.dequantize(codec.quantize(np.zeros(4)).values).tolist() == [0.0] * 4


def test_out_of_range_values_are_clipped_and_counted() -> None:
    codec = FixedPointCodec(-1.0, 1.0, 3, 32)

    result = codec.quantize(np.array([-5.0, 0.5, 1.0, 2.0]))

    assert result.clipped == 2
    assert np.allclose(codec.dequantize(result.values), [-1.0, 0.5, 1.0, 1.0], atol=codec.step)


def test_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        FixedPointCodec(-1.0, 1.0, 3, 32).quantize(np.array([0.0, np.nan]))


def test_required_bits_matches_the_worst_case_sum() -> None:
    assert required_bits(1, 8) == 9  # 2^8 itself needs 9 bits
    assert required_bits(10, 20) == 24  # 10 * 2^20 < 2^24
    assert required_bits(16, 20) == 25  # 16 * 2^20 = 2^24


def test_resolution_that_cannot_fit_the_modulus_is_refused_with_the_needed_bits() -> None:
    with pytest.raises(ValueError, match="needs a 33-bit modulus, but the modulus has 32 bits"):
        FixedPointCodec(-1.0, 1.0, 10, bits=32, value_bits=29)


def test_too_many_sites_for_the_modulus_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold the sum of 300 sites"):
        FixedPointCodec(-1.0, 1.0, 300, bits=8)


def test_decoding_more_sites_than_the_codec_was_sized_for_is_refused() -> None:
    codec = FixedPointCodec(-1.0, 1.0, 3, 32)

    with pytest.raises(ValueError, match="count"):
        codec.dequantize_sum(np.zeros(2, dtype=codec.dtype), 4)
