"""The site's side of SecAgg+: one object per site and round, one call per stage, in order.

    client = SecAggClient(node_id, SecAggConfig.from_record(cfg), layout)
    keys = client.advertise_keys()                           # stage 1 -> server
    bundles = client.share_keys(all_keys)                    # stage 2 -> server routes them
    masked = client.masked_input(my_bundles, update, weights)  # stage 3 -> server gets masked.vector
    reply = client.unmask(request)                           # stage 4 -> server

Between stages the client may be saved with ``to_state`` and rebuilt with ``from_state`` (a site
that answers every message in a new process keeps it in Flower's ``context.state``).

The site is the party that protects its own update, so it checks what the server sends: its own
keys must come back unchanged, all advertised keys must be distinct, bundles must authenticate,
and the unmask request must not ask for both shares of any node, must include the site itself
among the survivors and must cover at least the minimum number of sites. Any failed check moves
the client to ``FAILED`` (it answers nothing more this round) and raises.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedfusion.common.secagg.config import SecAggConfig
from fedfusion.common.secagg.errors import ProtocolViolation, SecAggAbort
from fedfusion.common.secagg.keys import (
    PURPOSE_ENCRYPTION,
    PURPOSE_MASK,
    SEED_BYTES,
    KeyPair,
    decrypt_bundle,
    derive_pairwise_seed,
    encrypt_bundle,
)
from fedfusion.common.secagg.layout import VectorLayout
from fedfusion.common.secagg.masking import apply_masks, vector_dtype
from fedfusion.common.secagg.messages import AdvertisedKeys, MaskedInput, Stage, UnmaskReply, UnmaskRequest
from fedfusion.common.secagg.quantize import QuantizeResult
from fedfusion.common.secagg.shamir import SHARE_BYTES, Share, split_secret_at


class SecAggClient:
    """State machine of one site for one round."""

    def __init__(self, node_id: int, config: SecAggConfig, layout: VectorLayout):
        if node_id not in config.node_ids:
            raise ValueError(f"node {node_id} is not among the round's sites")
        self.node_id = node_id
        self.config = config
        self._encoder = config.encoder(layout)
        self._neighbours = config.neighbours[node_id]
        self._stage = Stage.ADVERTISE_KEYS
        self._encryption_pair: KeyPair | None = None
        self._mask_pair: KeyPair | None = None
        self._self_seed: bytes | None = None
        self._keys: dict[int, AdvertisedKeys] = {}
        # node -> (share of its self-mask seed, share of its mask key) held by this site
        self._held: dict[int, tuple[bytes, bytes]] = {}

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def layout(self) -> VectorLayout:
        """The layout this client masks for (the one whose digest the round's config names)."""
        return self._encoder.layout

    def advertise_keys(self) -> AdvertisedKeys:
        """Stage 1: fresh X25519 pairs for this round (c: share encryption, s: mask agreement)."""
        self._begin(Stage.ADVERTISE_KEYS)
        self._encryption_pair, self._mask_pair = KeyPair.generate(), KeyPair.generate()
        self._stage = Stage.SHARE_KEYS
        return AdvertisedKeys(self._encryption_pair.public_bytes, self._mask_pair.public_bytes)

    def share_keys(self, keys: Mapping[int, AdvertisedKeys]) -> dict[int, bytes]:
        """Stage 2: Shamir-split a fresh self-mask seed b and the mask private key among the share
        holders that advertised keys; return one AES-GCM bundle per other holder (node id -> bytes)."""
        self._begin(Stage.SHARE_KEYS)
        assert self._encryption_pair is not None and self._mask_pair is not None
        own, mine = (self._encryption_pair.public_bytes, self._mask_pair.public_bytes), keys.get(self.node_id)
        if mine is None or (mine.encryption_key, mine.mask_key) != own:
            raise ProtocolViolation("the server did not return this site's own public keys unchanged")
        unknown = sorted(set(keys) - set(self.config.node_ids))
        if unknown:
            raise ProtocolViolation(f"keys advertised for nodes outside the round: {unknown[:5]}")
        published = [k for adv in keys.values() for k in (adv.encryption_key, adv.mask_key)]
        if len(set(published)) != len(published):
            raise ProtocolViolation("two advertised public keys are equal (a replayed key): refusing to share")
        holders = sorted((self._neighbours & set(keys)) | {self.node_id})
        if len(holders) < self.config.threshold:
            raise SecAggAbort(
                f"only {len(holders)} share holders advertised keys, the threshold is {self.config.threshold}"
            )
        self._keys = {node: keys[node] for node in holders}
        self._self_seed = secrets.token_bytes(SEED_BYTES)
        xs = [node + 1 for node in holders]  # holder id + 1: never 0, and the server can check who sent a share
        b_shares = split_secret_at(self._self_seed, self.config.threshold, xs)
        s_shares = split_secret_at(self._mask_pair.private_bytes, self.config.threshold, xs)
        bundles: dict[int, bytes] = {}
        for node, b_share, s_share in zip(holders, b_shares, s_shares, strict=True):
            plaintext = b_share.to_bytes() + s_share.to_bytes()
            if node == self.node_id:
                self._held[node] = (b_share.to_bytes(), s_share.to_bytes())
                continue
            key = derive_pairwise_seed(
                self._encryption_pair,
                keys[node].encryption_key,
                self.node_id,
                node,
                self.config.context,
                PURPOSE_ENCRYPTION,
            )
            bundles[node] = encrypt_bundle(key, plaintext, self.node_id, node, self.config.context)
        self._stage = Stage.MASKED_INPUT
        return bundles

    def encode(self, update: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> QuantizeResult:
        """``q(w * x)``: the update quantised for this round's layout, not yet masked (any stage).

        ``update`` maps parameter names to arrays within ``[-clip, clip]`` (larger entries are
        clipped and counted); ``weights`` maps each parameter group to this site's example count for
        it (0 or absent: the site lacks the group and contributes zeros). A site that answers each
        message in a new process keeps this one vector between stages instead of ~100 float tensors.
        """
        return self._encoder.encode(update, weights)

    def masked_input(
        self,
        bundles: Mapping[int, bytes],
        update: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
    ) -> MaskedInput:
        """Stage 3: :meth:`masked_encoded` of :meth:`encode` (``update``, ``weights``)."""
        return self.masked_encoded(bundles, self.encode(update, weights))

    def masked_encoded(self, bundles: Mapping[int, bytes], encoded: QuantizeResult) -> MaskedInput:
        """Stage 3: store the shares other holders sent (``bundles``: sender id -> ciphertext), then
        return ``y = q(w * x) + PRG(b) + sum_j sign * PRG(s_ij)`` mod 2^bits, pairwise masks only
        with neighbours whose bundles arrived (those that completed stage 2). ``encoded`` is
        :meth:`encode`'s result for this round.
        """
        self._begin(Stage.MASKED_INPUT)
        dtype = vector_dtype(self.config.bits)
        if encoded.values.shape != (self.layout.length,) or encoded.values.dtype != dtype:
            raise ValueError(f"the encoded update is {encoded.values.dtype}{list(encoded.values.shape)}, this round "
                             f"masks {dtype}[{self.layout.length}]")
        assert self._encryption_pair is not None and self._mask_pair is not None and self._self_seed is not None
        for sender, ciphertext in sorted(bundles.items()):
            if sender not in self._keys or sender == self.node_id:
                raise ProtocolViolation(f"a share bundle from node {sender}, which is not a share holder here")
            key = derive_pairwise_seed(
                self._encryption_pair,
                self._keys[sender].encryption_key,
                self.node_id,
                sender,
                self.config.context,
                PURPOSE_ENCRYPTION,
            )
            plaintext = decrypt_bundle(key, ciphertext, sender, self.node_id, self.config.context)
            if len(plaintext) != 2 * SHARE_BYTES:
                raise ProtocolViolation(f"the share bundle from node {sender} has the wrong length")
            b_share, s_share = plaintext[:SHARE_BYTES], plaintext[SHARE_BYTES:]
            for share in (b_share, s_share):
                if Share.from_bytes(share).x != self.node_id + 1:
                    raise ProtocolViolation(f"node {sender} sent a share meant for another holder")
            self._held[sender] = (b_share, s_share)
        if len(bundles) + 1 < self.config.threshold:
            raise SecAggAbort(
                f"only {len(bundles)} neighbours completed key sharing, the threshold is {self.config.threshold}"
            )
        pairwise = {
            peer: derive_pairwise_seed(
                self._mask_pair, self._keys[peer].mask_key, self.node_id, peer, self.config.context, PURPOSE_MASK
            )
            for peer in bundles
        }
        vector = apply_masks(encoded.values, self.node_id, self._self_seed, pairwise, self.config.bits)
        # The secrets are Shamir-shared now; this site no longer needs them (forward secrecy).
        self._self_seed = self._encryption_pair = self._mask_pair = None
        self._stage = Stage.UNMASK
        return MaskedInput(vector, encoded.clipped)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Stage 4: for each node whose shares this site holds, reveal the self-mask share if it
        survived or the mask-key share if it dropped. Refuses (``ProtocolViolation``) a request
        naming any node both ways, leaving this site out, or covering fewer than the minimum sites:
        any of those would let the server unmask an individual update."""
        self._begin(Stage.UNMASK)
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = sorted(survivors & dropped)
        if both:
            raise ProtocolViolation(
                f"the server asked for both shares of node(s) {both[:5]}: that would unmask an individual "
                "update; refusing to answer this round"
            )
        if self.node_id not in survivors:
            raise ProtocolViolation("the server listed this site as not surviving although it sent its masked input")
        outside = sorted((survivors | dropped) - set(self.config.node_ids))
        if outside:
            raise ProtocolViolation(f"the unmask request names nodes outside the round: {outside[:5]}")
        if len(survivors) < self.config.min_survivors:
            raise ProtocolViolation(
                f"the server asked to unmask a sum of {len(survivors)} sites; at least "
                f"{self.config.min_survivors} are required so that no site's update can be isolated"
            )
        reply = UnmaskReply(
            {node: shares[0] for node, shares in self._held.items() if node in survivors},
            {node: shares[1] for node, shares in self._held.items() if node in dropped},
        )
        self._held.clear()
        self._stage = Stage.DONE
        return reply

    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume this state machine in another process, as flat values
        (ints, str, bytes and lists of them) that fit a Flower ConfigRecord.

        Why: a deployed site answers each stage in a fresh process, so the round's private keys,
        self-mask seed and held shares must outlive the process that made them. The state holds
        secrets (private keys and the self-mask seed until stage 3, other sites' shares until stage
        4): keep it at the site only (Flower's per-run ``context.state`` lives in the SuperNode),
        never send it, and drop it when the round ends. Secrets already discarded are left out.
        """
        state: dict[str, Any] = {
            "node-id": self.node_id,
            "stage": self._stage.value,
            "layout": self._encoder.layout.to_json(),
            **{f"config.{key}": value for key, value in self.config.to_record().items()},
            "peers": sorted(self._keys),
            "peer-encryption-keys": [self._keys[node].encryption_key for node in sorted(self._keys)],
            "peer-mask-keys": [self._keys[node].mask_key for node in sorted(self._keys)],
            "held": sorted(self._held),
            "held-self-mask": [self._held[node][0] for node in sorted(self._held)],
            "held-mask-key": [self._held[node][1] for node in sorted(self._held)],
        }
        if self._encryption_pair is not None:
            state["encryption-private-key"] = self._encryption_pair.private_bytes
        if self._mask_pair is not None:
            state["mask-private-key"] = self._mask_pair.private_bytes
        if self._self_seed is not None:
            state["self-mask-seed"] = self._self_seed
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SecAggClient:
        """Inverse of ``to_state``; the configuration and layout are validated again."""
        try:
            config = SecAggConfig.from_record(
                {key[len("config.") :]: value for key, value in state.items() if key.startswith("config.")}
            )
            client = cls(int(state["node-id"]), config, VectorLayout.from_json(str(state["layout"])))
            client._stage = Stage(int(state["stage"]))
            peers = [int(node) for node in state["peers"]]
            client._keys = {
                node: AdvertisedKeys(bytes(enc), bytes(mask))
                for node, enc, mask in zip(
                    peers, state["peer-encryption-keys"], state["peer-mask-keys"], strict=True
                )
            }
            held = [int(node) for node in state["held"]]
            client._held = {
                node: (bytes(b), bytes(s))
                for node, b, s in zip(held, state["held-self-mask"], state["held-mask-key"], strict=True)
            }
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolViolation(f"the stored secure-aggregation state is unreadable: {err}") from err
        if "encryption-private-key" in state:
            client._encryption_pair = KeyPair.from_private_bytes(bytes(state["encryption-private-key"]))
        if "mask-private-key" in state:
            client._mask_pair = KeyPair.from_private_bytes(bytes(state["mask-private-key"]))
        if "self-mask-seed" in state:
            client._self_seed = bytes(state["self-mask-seed"])
        return client

    def _begin(self, expected: Stage) -> None:
        """Enter a stage; until it completes the client counts as failed, so an exception anywhere
        leaves it refusing every later call of this round."""
        if self._stage is not expected:
            raise ProtocolViolation(f"called for stage {expected.name} while in stage {self._stage.name}")
        self._stage = Stage.FAILED
