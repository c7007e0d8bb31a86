"""Everything the server receives, captured: no individual update or weight can be read from it;
only the unmasked sum comes out."""

from __future__ import annotations

import numpy as np
import pytest

from fedfusion.common.secagg import SecAggConfig, Transcript, VectorLayout, run_round
from fedfusion.common.secagg.masking import add_mask
from fedfusion.common.secagg.shamir import Share, combine_secret

NODES = [11, 22, 33, 44, 55]
LAYOUT = VectorLayout({"w": (4000,)}, {"w": "shared"})


def _round(drop_after: dict[int, int] | None = None) -> tuple[SecAggConfig, Transcript, dict, dict]:
    """A round whose inputs are maximally structured: every site sends zeros, or a constant."""
    config = SecAggConfig.create(NODES, LAYOUT, clip=1.0, bits=32, weight_bound=100.0, threshold=3)
    updates = {n: {"w": np.full(4000, 0.25 * (i % 2))} for i, n in enumerate(NODES)}
    weights = {n: {"shared": float(10 * (i + 1))} for i, n in enumerate(NODES)}
    transcript = Transcript()
    run_round(config, LAYOUT, updates, weights, drop_after=drop_after, transcript=transcript)
    return config, transcript, updates, weights


def test_each_masked_vector_looks_uniform_whatever_the_input() -> None:
    config, transcript, updates, weights = _round()
    encoder = config.encoder(LAYOUT)

    for node, vector in transcript.masked.items():
        quantised = encoder.encode(updates[node], weights[node]).values
        assert np.count_nonzero(vector == quantised) < 5  # chance agreements only (4001 draws of 2^-32)
        bit_frequency = np.unpackbits(vector.astype("<u4").view(np.uint8)).reshape(-1, 32).mean(axis=0)
        assert np.all(np.abs(bit_frequency - 0.5) < 0.06)  # 4001 samples per bit: 7 standard deviations


def test_server_never_gets_both_shares_of_any_node() -> None:
    _, transcript, _, _ = _round(drop_after={44: 2})

    self_mask_nodes = {n for reply in transcript.replies.values() for n in reply.self_mask_shares}
    mask_key_nodes = {n for reply in transcript.replies.values() for n in reply.mask_key_shares}

    assert self_mask_nodes == set(transcript.request.survivors)
    assert mask_key_nodes == {44}
    assert 44 not in transcript.masked  # the node whose mask key is rebuilt never sent a masked input


def test_removing_a_survivors_self_mask_still_leaves_its_update_hidden() -> None:
    """The server can rebuild a survivor's self-mask seed (that is the protocol); its vector then
    still carries pairwise masks, which only cancel in the sum."""
    config, transcript, updates, weights = _round()
    encoder = config.encoder(LAYOUT)
    node = 33
    shares = [Share.from_bytes(r.self_mask_shares[node]) for r in transcript.replies.values()]
    peeled = transcript.masked[node].copy()

    add_mask(peeled, combine_secret(shares[: config.threshold]), config.bits, sign=-1)

    quantised = encoder.encode(updates[node], weights[node]).values
    assert np.count_nonzero(peeled == quantised) < 5


def test_server_output_is_only_the_sum() -> None:
    config = SecAggConfig.create(NODES, LAYOUT, clip=1.0, bits=64, weight_bound=100.0)
    updates = {n: {"w": np.full(4000, 0.1 * i)} for i, n in enumerate(NODES)}
    weights = {n: {"shared": 10.0} for n in NODES}

    result = run_round(config, LAYOUT, updates, weights)

    assert set(vars(result)) == {"sums", "weight_sums", "groups", "survivors", "dropped"}
    assert np.allclose(result.sums["w"], 10.0 * sum(0.1 * i for i in range(5)), atol=1e-6)
    assert result.weight_sums["shared"] == pytest.approx(50.0, abs=1e-6)
