"""The server's side of SecAgg+: collects, routes, and unmasks only the sum.

    server = SecAggServer(config, layout)
    broadcast = server.collect_keys(keys_by_node)              # -> every site (stage 2 input)
    routed = server.route_shares(bundles_by_sender)            # routed[recipient] -> that site (stage 3)
    request = server.collect_masked_inputs(vectors_by_node)    # -> every survivor (stage 4)
    result = server.unmask(replies_by_node)                    # AggregateResult: sums only

Each call takes the replies that arrived; a node missing from them has dropped out. A reply from
a node outside the expected set, or a malformed one, is ignored and recorded in ``rejected`` (that
node then counts as dropped), so one broken site cannot stop the round. Masked vectors are added
into a running sum as they are collected and never stored one by one. ``SecAggAbort`` means too
few sites remain: the round fails cleanly and nothing individual was revealed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedfusion.common.secagg.config import SecAggConfig
from fedfusion.common.secagg.errors import ProtocolViolation, SecAggAbort
from fedfusion.common.secagg.keys import PUBLIC_KEY_BYTES, PURPOSE_MASK, KeyPair, derive_pairwise_seed
from fedfusion.common.secagg.layout import VectorLayout
from fedfusion.common.secagg.masking import add_masks, pairwise_sign, reduce, vector_dtype
from fedfusion.common.secagg.messages import AdvertisedKeys, AggregateResult, Stage, UnmaskReply, UnmaskRequest
from fedfusion.common.secagg.shamir import Share, combine_secret


class SecAggServer:
    """State machine of the aggregation server for one round."""

    def __init__(self, config: SecAggConfig, layout: VectorLayout):
        self.config = config
        self._layout = layout
        self._encoder = config.encoder(layout)
        self._stage = Stage.ADVERTISE_KEYS
        self._keys: dict[int, AdvertisedKeys] = {}
        self._shared: set[int] = set()
        self._survivors: set[int] = set()
        self._total: np.ndarray | None = None
        self.rejected: dict[int, str] = {}
        """Node id -> why its reply was ignored (for the server log; contains no values)."""

    @property
    def stage(self) -> Stage:
        return self._stage

    def collect_keys(self, keys: Mapping[int, AdvertisedKeys]) -> dict[int, AdvertisedKeys]:
        """Stage 1 -> 2: the advertised keys to broadcast to every site that sent them."""
        self._begin(Stage.ADVERTISE_KEYS)
        seen: set[bytes] = set()
        for node, adv in sorted(keys.items()):
            if not self._accept(node, set(self.config.node_ids)):
                continue
            if len(adv.encryption_key) != PUBLIC_KEY_BYTES or len(adv.mask_key) != PUBLIC_KEY_BYTES:
                self.rejected[node] = "public keys of the wrong length"
            elif {adv.encryption_key, adv.mask_key} & seen or adv.encryption_key == adv.mask_key:
                self.rejected[node] = "reused a public key already advertised"
            else:
                seen |= {adv.encryption_key, adv.mask_key}
                self._keys[node] = adv
        self._require(len(self._keys), "advertised keys")
        self._stage = Stage.SHARE_KEYS
        return dict(self._keys)

    def route_shares(self, bundles: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Stage 2 -> 3: ``bundles[sender][recipient]`` regrouped as ``routed[recipient][sender]``
        for every recipient that itself completed stage 2."""
        self._begin(Stage.SHARE_KEYS)
        valid: dict[int, Mapping[int, bytes]] = {}
        for sender, outgoing in sorted(bundles.items()):
            if not self._accept(sender, set(self._keys)):
                continue
            expected = (self.config.neighbours[sender] & set(self._keys)) - {sender}
            if set(outgoing) != expected:
                self.rejected[sender] = "share bundles not addressed to exactly its neighbours"
            else:
                valid[sender] = outgoing
        self._shared = set(valid)
        self._require(len(self._shared), "shared their keys")
        routed: dict[int, dict[int, bytes]] = {node: {} for node in self._shared}
        for sender, outgoing in valid.items():
            for recipient, ciphertext in outgoing.items():
                if recipient in self._shared:
                    routed[recipient][sender] = bytes(ciphertext)
        self._stage = Stage.MASKED_INPUT
        return routed

    def collect_masked_inputs(self, vectors: Mapping[int, np.ndarray]) -> UnmaskRequest:
        """Stage 3 -> 4: add the masked vectors into the running sum; return the unmask request."""
        self._begin(Stage.MASKED_INPUT)
        dtype, bits = vector_dtype(self.config.bits), self.config.bits
        total = np.zeros(self._layout.length, dtype=dtype)
        for node, vector in sorted(vectors.items()):
            if not self._accept(node, self._shared):
                continue
            vector = np.asarray(vector)
            if vector.dtype != dtype or vector.shape != (self._layout.length,):
                self.rejected[node] = f"masked vector is not a ({self._layout.length},) {dtype} array"
            elif bits not in (32, 64) and int(vector.max(initial=0)) >> bits:
                self.rejected[node] = f"masked vector has values of {bits} bits or more"
            else:
                np.add(total, vector, out=total)
                self._survivors.add(node)
        self._require(len(self._survivors), "sent masked inputs")
        self._total = reduce(total, bits)
        self._stage = Stage.UNMASK
        return UnmaskRequest(tuple(sorted(self._survivors)), tuple(sorted(self._shared - self._survivors)))

    def unmask(self, replies: Mapping[int, UnmaskReply]) -> AggregateResult:
        """Stage 4: rebuild each survivor's self-mask seed and each dropped node's mask key from the
        shares of at least ``threshold`` of its holders, remove those masks from the sum, decode."""
        self._begin(Stage.UNMASK)
        assert self._total is not None
        survivors, dropped = self._survivors, self._shared - self._survivors
        b_shares: dict[int, list[Share]] = {node: [] for node in survivors}
        s_shares: dict[int, list[Share]] = {node: [] for node in dropped}
        for holder, reply in sorted(replies.items()):
            if not self._accept(holder, survivors):
                continue
            try:
                b = self._parse_shares(holder, reply.self_mask_shares, survivors)
                s = self._parse_shares(holder, reply.mask_key_shares, dropped)
            except (ValueError, ProtocolViolation) as err:
                self.rejected[holder] = f"bad unmask reply: {err}"
                continue
            for node, share in b.items():
                b_shares[node].append(share)
            for node, share in s.items():
                s_shares[node].append(share)
        total, bits = self._total, self.config.bits
        masks = [(self._reconstruct(node, b_shares[node], "self-mask seed"), -1) for node in sorted(survivors)]
        for node in sorted(dropped):
            secret_key = KeyPair.from_private_bytes(self._reconstruct(node, s_shares[node], "mask key"))
            if secret_key.public_bytes != self._keys[node].mask_key:
                raise ProtocolViolation(f"the shares of node {node}'s mask key do not match its public key")
            for peer in sorted(self.config.neighbours[node] & survivors):
                seed = derive_pairwise_seed(
                    secret_key, self._keys[peer].mask_key, node, peer, self.config.context, PURPOSE_MASK
                )
                masks.append((seed, -pairwise_sign(peer, node)))  # undo what the survivor added
        add_masks(total, masks, bits)
        sums, weight_sums = self._encoder.decode_sum(total, len(survivors))
        self._total = None
        self._stage = Stage.DONE
        groups = {entry.name: entry.group for entry in self._layout.entries}
        return AggregateResult(sums, weight_sums, groups, tuple(sorted(survivors)), tuple(sorted(dropped)))

    def _reconstruct(self, node: int, shares: list[Share], what: str) -> bytes:
        threshold = self.config.threshold
        if len(shares) < threshold:
            raise SecAggAbort(
                f"cannot recover node {node}'s {what}: {len(shares)} of its share holders answered, "
                f"{threshold} are needed (too many sites dropped out)"
            )
        try:
            return combine_secret(sorted(shares, key=lambda s: s.x)[:threshold])
        except ValueError as err:
            raise ProtocolViolation(f"the shares of node {node}'s {what} are inconsistent") from err

    def _parse_shares(self, holder: int, shares: Mapping[int, bytes], allowed: set[int]) -> dict[int, Share]:
        """Shares one reply holds for ``allowed`` nodes; each must be the holder's own point."""
        parsed: dict[int, Share] = {}
        for node, raw in shares.items():
            if node not in allowed or holder not in self.config.holders(node):
                raise ProtocolViolation(f"a share of node {node}, which this holder was not asked for")
            share = Share.from_bytes(raw)
            if share.x != holder + 1:
                raise ProtocolViolation("a share that belongs to another holder")
            parsed[node] = share
        return parsed

    def _accept(self, node: int, expected: set[int]) -> bool:
        if node not in expected:
            self.rejected[node] = "replied although not expected in this stage"
            return False
        return True

    def _require(self, count: int, what: str) -> None:
        if count < self.config.min_survivors:
            raise SecAggAbort(
                f"only {count} sites {what}; at least {self.config.min_survivors} are needed "
                f"(threshold {self.config.threshold}, minimum {self.config.min_survivors} sites per sum)"
            )

    def _begin(self, expected: Stage) -> None:
        if self._stage is not expected:
            raise ProtocolViolation(f"called for stage {expected.name} while in stage {self._stage.name}")
        self._stage = Stage.FAILED
