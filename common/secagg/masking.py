"""Mask expansion and arithmetic modulo 2^bits.

Masks come from AES-256-CTR keyed with a 32-byte seed: a cryptographic PRG, so a mask reveals
nothing about its seed and the server cannot search the seed space. (Flower's legacy SecAgg+
folds the 32-byte seed into a 32-bit NumPy Mersenne-Twister seed, which a server can brute-force
in 2^32 steps; NumPy's RNG is never used here.) Each seed keys exactly one stream per round (the
self-mask seed is fresh per round, pairwise seeds are bound to the round's context by HKDF), so
the fixed zero IV never repeats a keystream.

Pairwise masks cancel: for the pair (i, j) the lower id adds PRG(s_ij) and the higher id
subtracts it, so in the sum over both sites they vanish exactly, modulo 2^bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedfusion.common.secagg.keys import SEED_BYTES

MIN_BITS = 8
MAX_BITS = 64
_AES_BLOCK = 16
_CHUNK_BYTES = 1 << 18  # 256 KiB: a chunk of the vector and of the keystream stay in L2 cache


def vector_dtype(bits: int) -> np.dtype:
    """Smallest unsigned dtype holding values mod 2^bits: uint32 up to 32 bits (as many bytes as
    float32 on the wire), uint64 above."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"the modulus must have {MIN_BITS}..{MAX_BITS} bits, got {bits}")
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def reduce(vector: np.ndarray, bits: int) -> np.ndarray:
    """Reduce in place modulo 2^bits (dtype arithmetic already wraps modulo 2^32 or 2^64, which
    2^bits divides, so one AND at the end is exact)."""
    if bits not in (32, 64):
        np.bitwise_and(vector, vector.dtype.type((1 << bits) - 1), out=vector)
    return vector


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform values modulo 2^bits from the AES-256-CTR keystream of ``seed``."""
    return add_masks(np.zeros(length, dtype=vector_dtype(bits)), [(seed, 1)], bits)


def pairwise_sign(own_id: int, peer_id: int) -> int:
    """+1 when ``own_id`` is the lower id of the pair, -1 otherwise: the two signs cancel in the sum."""
    if own_id == peer_id:
        raise ValueError("a node has no pairwise mask with itself")
    return 1 if own_id < peer_id else -1


def add_mask(vector: np.ndarray, seed: bytes, bits: int, sign: int = 1) -> np.ndarray:
    """``vector += sign * PRG(seed)`` modulo 2^bits, in place."""
    return add_masks(vector, [(seed, sign)], bits)


def add_masks(vector: np.ndarray, masks: Sequence[tuple[bytes, int]], bits: int) -> np.ndarray:
    """``vector += sum(sign * PRG(seed) for seed, sign in masks)`` modulo 2^bits, in place.

    Works chunk by chunk with every mask's keystream continuing where it left off, so the chunk of
    ``vector`` stays in cache while all masks are added (the masks are never materialised whole).
    Dtype arithmetic wraps modulo 2^32 or 2^64, so one reduction at the end is exact.
    """
    dtype = vector_dtype(bits)
    if vector.dtype != dtype or vector.ndim != 1:
        raise ValueError(f"masked vectors are 1-D {dtype} arrays, got {vector.ndim}-D {vector.dtype}")
    for seed, _ in masks:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"mask seeds are {SEED_BYTES} bytes, got {len(seed)}")
    streams = [(Cipher(algorithms.AES(seed), modes.CTR(bytes(_AES_BLOCK))).encryptor(), sign) for seed, sign in masks]
    chunk = _CHUNK_BYTES // dtype.itemsize
    zeros = np.zeros(chunk * dtype.itemsize, dtype=np.uint8)
    buffer = np.empty(zeros.size + _AES_BLOCK, dtype=np.uint8)  # update_into wants one block of slack
    for start in range(0, vector.size, chunk):
        part = vector[start : start + chunk]
        nbytes = part.size * dtype.itemsize
        mask = buffer[:nbytes].view(dtype)
        for stream, sign in streams:
            stream.update_into(zeros[:nbytes], buffer)
            (np.add if sign > 0 else np.subtract)(part, mask, out=part)
    return reduce(vector, bits)


def apply_masks(
    vector: np.ndarray,
    own_id: int,
    self_seed: bytes,
    pairwise_seeds: Mapping[int, bytes],
    bits: int,
) -> np.ndarray:
    """A site's masked input ``y = x + PRG(b) + sum_j sign(i, j) * PRG(s_ij)`` modulo 2^bits (a new array).

    ``pairwise_seeds`` maps each neighbour that took part in the share-keys stage to s_ij.
    """
    masked = np.array(vector, dtype=vector_dtype(bits), copy=True)
    pairwise = [(seed, pairwise_sign(own_id, peer_id)) for peer_id, seed in sorted(pairwise_seeds.items())]
    return add_masks(masked, [(self_seed, 1), *pairwise], bits)
