"""X25519 key agreement, HKDF-SHA256 seed derivation and AES-GCM for the share bundles.

Every site makes two fresh X25519 pairs per round (Bonawitz et al. 2017): ``c`` keys encrypt the
Shamir shares the server routes between sites, ``s`` keys agree the pairwise mask seeds. Keeping
them apart means reconstructing a dropped site's ``s`` key (which the protocol does on purpose)
never lets the server read the share bundles that site exchanged.

Derivation binds everything a seed must not be reused across: a version label, the purpose
(``mask`` or ``share-encryption``), both node ids in canonical (ascending) order, so that ``i`` and
``j`` derive the same value, and the round's context id. AES-GCM's associated data binds sender,
receiver and context, so the server cannot re-route or replay a bundle to another site or round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedfusion.common.secagg.errors import ProtocolViolation

SEED_BYTES = 32
"""Length of every seed and symmetric key."""
PUBLIC_KEY_BYTES = 32
"""Length of a raw X25519 public key."""

PURPOSE_MASK = b"mask"
PURPOSE_ENCRYPTION = b"share-encryption"

_LABEL = b"fedfusion/secagg/v1"
_NONCE_BYTES = 12
_MAX_NODE_ID = 2**64


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; only ``public_bytes`` ever leaves the site."""

    private_key: X25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """Rebuild a pair from a 32-byte private key (the server does this for a dropped site's s key)."""
        if len(raw) != SEED_BYTES:
            raise ValueError(f"an X25519 private key is {SEED_BYTES} bytes, got {len(raw)}")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    @property
    def private_bytes(self) -> bytes:
        """Raw private key: only ever Shamir-shared, never sent in the clear."""
        return self.private_key.private_bytes_raw()


def public_key_from_bytes(raw: bytes) -> X25519PublicKey:
    """Parse a raw 32-byte X25519 public key."""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ProtocolViolation(f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def derive_pairwise_seed(
    own: KeyPair,
    peer_public: bytes,
    own_id: int,
    peer_id: int,
    context: bytes,
    purpose: bytes = PURPOSE_MASK,
) -> bytes:
    """32-byte seed shared by ``own_id`` and ``peer_id``: HKDF-SHA256 of the X25519 shared secret.

    The ids enter in ascending order so both ends derive the same seed. Refuses a low-order peer
    key (all-zero shared secret), which would let the server fix the seed.
    """
    if own_id == peer_id:
        raise ValueError("a node has no pairwise seed with itself")
    try:
        shared = own.private_key.exchange(public_key_from_bytes(peer_public))
    except ValueError as err:  # cryptography refuses an all-zero shared secret
        raise ProtocolViolation(f"node {peer_id} advertised an invalid (low-order) X25519 key") from err
    low, high = sorted((own_id, peer_id))
    info = b"|".join((_LABEL, purpose, _id_bytes(low), _id_bytes(high), context))
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def encrypt_bundle(key: bytes, plaintext: bytes, sender: int, receiver: int, context: bytes) -> bytes:
    """AES-256-GCM with a fresh random nonce (prepended); associated data binds sender, receiver and
    round, so a bundle cannot be replayed to another node or round without failing authentication."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _associated_data(sender, receiver, context))


def decrypt_bundle(key: bytes, ciphertext: bytes, sender: int, receiver: int, context: bytes) -> bytes:
    """Inverse of ``encrypt_bundle``; a tampered, misrouted or replayed bundle raises ``ProtocolViolation``."""
    if len(ciphertext) < _NONCE_BYTES + 16:
        raise ProtocolViolation(f"the share bundle from node {sender} is too short to be a ciphertext")
    nonce, body = ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, _associated_data(sender, receiver, context))
    except InvalidTag as err:
        raise ProtocolViolation(
            f"the share bundle from node {sender} to node {receiver} failed authentication (tampered or misrouted)"
        ) from err


def _associated_data(sender: int, receiver: int, context: bytes) -> bytes:
    return b"|".join((_LABEL, b"bundle", _id_bytes(sender), _id_bytes(receiver), context))


def _id_bytes(node_id: int) -> bytes:
    if not 0 <= node_id < _MAX_NODE_ID:
        raise ValueError(f"node ids must be unsigned 64-bit integers, got {node_id}")
    return node_id.to_bytes(8, "big")
