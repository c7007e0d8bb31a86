"""Masks come from AES-CTR (not NumPy's RNG), look uniform, and pairwise masks cancel exactly."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfusion.common.secagg.masking import (
    add_mask,
    apply_masks,
    expand_mask,
    pairwise_sign,
    reduce,
    vector_dtype,
)

BITS = st.sampled_from([8, 13, 32, 40, 64])


@pytest.mark.parametrize(("bits", "dtype"), [(32, np.uint32), (64, np.uint64)])
def test_mask_is_the_aes_ctr_keystream_of_the_seed(bits: int, dtype: type) -> None:
    seed = bytes(range(32))
    length = 150_001  # spans several chunks of the chunked expansion, and ends mid-chunk

    mask = expand_mask(seed, length, bits)

    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(length * mask.itemsize))
    assert np.array_equal(mask, np.frombuffer(stream, dtype=dtype))


@pytest.mark.parametrize("bits", [8, 20, 32, 33, 64])
def test_mask_has_the_right_dtype_and_range(bits: int) -> None:
    mask = expand_mask(secrets.token_bytes(32), 5000, bits)

    assert mask.dtype == vector_dtype(bits)
    assert mask.shape == (5000,)
    if bits < 64:
        assert int(mask.max()) < 2**bits


def test_mask_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    seed = secrets.token_bytes(32)

    assert np.array_equal(expand_mask(seed, 100, 32), expand_mask(seed, 100, 32))
    assert not np.array_equal(expand_mask(seed, 100, 32), expand_mask(secrets.token_bytes(32), 100, 32))


def test_mask_bits_are_balanced() -> None:
    mask = expand_mask(secrets.token_bytes(32), 100_000, 16)

    ones = np.unpackbits(mask.astype("<u2").view(np.uint8)).mean()

    assert abs(ones - 0.5) < 0.005  # 1.6M bits: std 0.0004


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=2, max_size=6, unique=True), BITS, st.integers(1, 64))
def test_pairwise_masks_cancel_exactly(nodes: list[int], bits: int, length: int) -> None:
    seeds = {frozenset(pair): secrets.token_bytes(32) for pair in _pairs(nodes)}
    total = np.zeros(length, dtype=vector_dtype(bits))

    for node in nodes:
        masked = np.zeros(length, dtype=vector_dtype(bits))
        for peer in nodes:
            if peer != node:
                add_mask(masked, seeds[frozenset((node, peer))], bits, pairwise_sign(node, peer))
        total += masked

    assert not reduce(total, bits).any()


@settings(max_examples=20, deadline=None)
@given(BITS, st.integers(2, 5))
def test_masked_inputs_sum_to_the_inputs_once_self_masks_are_removed(bits: int, n: int) -> None:
    rng = np.random.default_rng(n)
    nodes = list(range(10, 10 + n))
    seeds = {frozenset(pair): secrets.token_bytes(32) for pair in _pairs(nodes)}
    self_seeds = {node: secrets.token_bytes(32) for node in nodes}
    inputs = {node: rng.integers(0, 2 ** min(bits, 63) // n, 50).astype(vector_dtype(bits)) for node in nodes}

    total = np.zeros(50, dtype=vector_dtype(bits))
    for node in nodes:
        pairwise = {peer: seeds[frozenset((node, peer))] for peer in nodes if peer != node}
        total += apply_masks(inputs[node], node, self_seeds[node], pairwise, bits)
    for node in nodes:
        add_mask(total, self_seeds[node], bits, sign=-1)

    assert np.array_equal(total, sum(inputs.values()))


def test_refuses_short_seeds_and_bad_moduli() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        expand_mask(b"short", 10, 32)
    with pytest.raises(ValueError, match="bits"):
        vector_dtype(65)
    with pytest.raises(ValueError, match="itself"):
        pairwise_sign(3, 3)


def _pairs(nodes: list[int]) -> list[tuple[int, int]]:
    return [(a, b) for a in nodes for b in nodes if a < b]
