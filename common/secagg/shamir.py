"""Shamir secret sharing over the prime field GF(2^521 - 1).

Why this field: the secrets are 32-byte seeds (a self-mask seed and an X25519 private key). A
prime larger than 2^256 holds a whole seed in one field element, so there is no splitting into
chunks whose shares could be mixed up; 2^521 - 1 is a Mersenne prime (a well-known constant, so no
home-made primality claims) and big-int arithmetic on it is fast in Python.

Security: a random polynomial of degree ``threshold - 1`` with the secret as constant term; its
coefficients come from ``secrets`` (the OS CSPRNG), never from NumPy or ``random``. Any
``threshold - 1`` shares are consistent with every possible secret, so they reveal nothing;
``threshold`` shares determine it. Shares carry no integrity protection of their own: the protocol
delivers them inside AES-GCM and checks reconstructed keys against published public keys.
Python big-int arithmetic is not constant-time; shares are handled only at the sites and at the
aggregation server, never across a timing-observable boundary to a third party.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1
"""The field modulus (the Mersenne prime M521)."""

_X_BYTES = 16  # x-coordinates are node ids + 1, so up to 2^64: 16 bytes leave room
_Y_BYTES = (PRIME.bit_length() + 7) // 8  # 66
SHARE_BYTES = _X_BYTES + _Y_BYTES
"""Length of a serialised share (``Share.to_bytes``)."""


@dataclass(frozen=True)
class Share:
    """One point ``(x, y)`` of the sharing polynomial; ``x`` is never 0 (that point is the secret)."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """Fixed-length big-endian encoding (``SHARE_BYTES`` long), so ciphertext lengths reveal nothing."""
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse ``to_bytes`` output; refuses wrong lengths and out-of-field values."""
        if len(data) != SHARE_BYTES:
            raise ValueError(f"a Shamir share is {SHARE_BYTES} bytes, got {len(data)}")
        share = cls(int.from_bytes(data[:_X_BYTES], "big"), int.from_bytes(data[_X_BYTES:], "big"))
        _check_point(share.x, share.y)
        return share


def split_int(secret: int, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of ``secret`` (an int in [0, PRIME)) at the given distinct non-zero ``xs``.

    ``threshold`` of them reconstruct it; fewer reveal nothing about it.
    """
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must lie in [0, 2^521 - 1)")
    if len(set(xs)) != len(xs):
        raise ValueError("share x-coordinates must be distinct")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be between 1 and the number of shares ({len(xs)}), got {threshold}")
    for x in xs:
        _check_point(x, 0)
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in xs]


def combine_int(shares: Sequence[Share]) -> int:
    """Lagrange interpolation at 0. With at least ``threshold`` honest shares this is the secret;
    with fewer it is an unrelated field element (no error can be raised: fewer shares are valid
    points of many polynomials)."""
    if not shares:
        raise ValueError("need at least one share")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("shares with duplicate x-coordinates: the same holder was counted twice")
    total = 0
    for j, share in enumerate(shares):
        numerator, denominator = 1, 1
        for m, other in enumerate(xs):
            if m != j:
                numerator = numerator * other % PRIME
                denominator = denominator * (other - share.x) % PRIME
        total = (total + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def split_secret(secret: bytes, threshold: int, num_shares: int) -> list[Share]:
    """Shares of a byte string (at most 64 bytes) at x = 1..num_shares."""
    return split_secret_at(secret, threshold, list(range(1, num_shares + 1)))


def split_secret_at(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of a byte string (at most 64 bytes) at the given x-coordinates (e.g. holder id + 1)."""
    if len(secret) > 64:
        raise ValueError("secrets longer than 64 bytes do not fit one field element")
    return split_int(int.from_bytes(secret, "big"), threshold, xs)


def combine_secret(shares: Sequence[Share], length: int = 32) -> bytes:
    """Reconstruct a ``length``-byte secret.

    Raises ``ValueError`` when the interpolated value does not fit ``length`` bytes, which is what
    too few or corrupted shares give with probability 1 - 2^-(521 - 8*length).
    """
    value = combine_int(shares)
    if value.bit_length() > 8 * length:
        raise ValueError(
            f"the shares do not reconstruct a {length}-byte secret: too few shares, or shares of another secret"
        )
    return value.to_bytes(length, "big")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Horner evaluation of the polynomial (constant term first) at ``x`` mod PRIME."""
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result


def _check_point(x: int, y: int) -> None:
    if not 0 < x < PRIME:
        raise ValueError("a share's x-coordinate must be in [1, 2^521 - 1): x = 0 would be the secret itself")
    if not 0 <= y < PRIME:
        raise ValueError("a share's y-coordinate must lie in the field [0, 2^521 - 1)")
