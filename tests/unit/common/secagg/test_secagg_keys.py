"""Key agreement gives both ends the same seed, bound to ids, purpose and round; bundles authenticate."""

from __future__ import annotations

import pytest

from fedfusion.common.secagg.errors import ProtocolViolation
from fedfusion.common.secagg.keys import (
    PURPOSE_ENCRYPTION,
    PURPOSE_MASK,
    KeyPair,
    decrypt_bundle,
    derive_pairwise_seed,
    encrypt_bundle,
)

CONTEXT = b"round-0001-context"


def test_both_ends_derive_the_same_32_byte_seed() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()

    ab = derive_pairwise_seed(alice, bob.public_bytes, 3, 9, CONTEXT)
    ba = derive_pairwise_seed(bob, alice.public_bytes, 9, 3, CONTEXT)

    assert ab == ba
    assert len(ab) == 32


def test_seed_is_bound_to_purpose_context_and_node_ids() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()
    base = derive_pairwise_seed(alice, bob.public_bytes, 3, 9, CONTEXT)

    variants = {
        derive_pairwise_seed(alice, bob.public_bytes, 3, 9, CONTEXT, PURPOSE_ENCRYPTION),
        derive_pairwise_seed(alice, bob.public_bytes, 3, 9, b"round-0002-context", PURPOSE_MASK),
        derive_pairwise_seed(alice, bob.public_bytes, 3, 10, CONTEXT),
    }

    assert base not in variants
    assert len(variants) == 3


def test_private_key_rebuilt_from_raw_bytes_has_the_same_public_key() -> None:
    pair = KeyPair.generate()

    assert KeyPair.from_private_bytes(pair.private_bytes).public_bytes == pair.public_bytes


def test_low_order_public_key_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="low-order"):
        derive_pairwise_seed(KeyPair.generate(), bytes(32), 1, 2, CONTEXT)


def test_bundle_round_trips_and_uses_a_fresh_nonce() -> None:
    key = bytes(range(32))

    first = encrypt_bundle(key, b"shares", 1, 2, CONTEXT)
    second = encrypt_bundle(key, b"shares", 1, 2, CONTEXT)

    assert first != second
    assert decrypt_bundle(key, first, 1, 2, CONTEXT) == b"shares"


@pytest.mark.parametrize(
    ("sender", "receiver", "context"),
    [(2, 2, CONTEXT), (1, 3, CONTEXT), (1, 2, b"another-round-ctx")],
    ids=["other-sender", "other-receiver", "replayed-round"],
)
def test_misrouted_or_replayed_bundle_fails_authentication(sender: int, receiver: int, context: bytes) -> None:
    key = bytes(range(32))
    bundle = encrypt_bundle(key, b"shares", 1, 2, CONTEXT)

    with pytest.raises(ProtocolViolation, match="authentication"):
        decrypt_bundle(key, bundle, sender, receiver, context)


def test_tampered_bundle_fails_authentication() -> None:
    key = bytes(range(32))
    bundle = bytearray(encrypt_bundle(key, b"shares", 1, 2, CONTEXT))
    bundle[-1] ^= 1

    with pytest.raises(ProtocolViolation):
        decrypt_bundle(key, bytes(bundle), 1, 2, CONTEXT)


def test_node_ids_must_fit_64_bits() -> None:
    alice, bob = KeyPair.generate(), KeyPair.generate()

    with pytest.raises(ValueError, match="64-bit"):
        derive_pairwise_seed(alice, bob.public_bytes, 1, 2**64, CONTEXT)
