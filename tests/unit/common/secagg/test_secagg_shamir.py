"""Shamir sharing: any t of n shares reconstruct the secret, t - 1 do not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfusion.common.secagg.shamir import (
    PRIME,
    SHARE_BYTES,
    Share,
    combine_int,
    combine_secret,
    split_int,
    split_secret,
    split_secret_at,
)


@st.composite
def _sharing(draw: st.DrawFn) -> tuple[bytes, int, int, list[int]]:
    """A secret, a threshold t <= n, and a random subset of share indices of size >= t."""
    n = draw(st.integers(1, 9))
    t = draw(st.integers(1, n))
    size = draw(st.integers(t, n))
    subset = draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size, unique=True))
    return draw(st.binary(min_size=32, max_size=32)), t, n, subset


def test_field_modulus_is_prime_by_fermat_checks() -> None:
    assert PRIME.bit_length() == 521
    for base in (2, 3, 5, 7, 11):
        assert pow(base, PRIME - 1, PRIME) == 1


@settings(max_examples=60, deadline=None)
@given(_sharing())
def test_any_threshold_subset_reconstructs(case: tuple[bytes, int, int, list[int]]) -> None:
    secret, t, n, subset = case
    shares = split_secret(secret, t, n)

    assert combine_secret([shares[i] for i in subset]) == secret


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(2, 8), st.data())
def test_fewer_than_threshold_shares_do_not_reconstruct(secret: bytes, t: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(t, 9))
    shares = split_secret(secret, t, n)
    subset = data.draw(st.lists(st.sampled_from(shares), min_size=t - 1, max_size=t - 1, unique=True))

    # t - 1 points fit a polynomial through any value at 0: what interpolation yields is unrelated to
    # the secret (equal with probability 2^-521), and almost never even a 32-byte value.
    assert combine_int(subset) != int.from_bytes(secret, "big")
    with pytest.raises(ValueError, match="do not reconstruct"):
        combine_secret(subset)


def test_share_serialisation_round_trips_and_has_fixed_length() -> None:
    share = split_secret_at(b"\x01" * 32, 2, [7, 2**64])[1]

    data = share.to_bytes()

    assert len(data) == SHARE_BYTES
    assert Share.from_bytes(data) == share


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: split_int(PRIME, 2, [1, 2]), "secret must lie"),
        (lambda: split_int(1, 3, [1, 2]), "threshold must be between"),
        (lambda: split_int(1, 2, [1, 1]), "distinct"),
        (lambda: split_int(1, 2, [0, 1]), "x = 0 would be the secret"),
        (lambda: split_secret(b"x" * 65, 2, 3), "64 bytes"),
        (lambda: combine_int([Share(1, 2), Share(1, 3)]), "duplicate"),
        (lambda: Share.from_bytes(b"short"), "bytes"),
    ],
)
def test_invalid_inputs_are_refused(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
