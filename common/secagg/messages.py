"""What travels between sites and server in the four stages, as plain Python/NumPy values.

Every field is bytes, ints, a tuple of ints or a 1-D unsigned NumPy array, so the Flower wiring can
put them in ConfigRecords / ArrayRecords without knowing the protocol. Dicts keyed by node id
need ``str`` keys in a ConfigRecord; ``to_dict`` / ``from_dict`` do that conversion.

What the server sees, stage by stage: public keys; AES-GCM ciphertexts it cannot open; masked
vectors that are uniformly random modulo 2^bits on their own; and, per node, Shamir shares of
*either* its self-mask seed (it survived: its own vector is in the sum) *or* its mask key (it
dropped: its pairwise masks must be removed), never both. What it outputs: the sum.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Stage(enum.Enum):
    """Protocol stages; a state machine accepts exactly one call per stage, in order."""

    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    UNMASK = 4
    DONE = 5
    FAILED = 6


@dataclass(frozen=True)
class AdvertisedKeys:
    """Stage 1 reply: raw X25519 public keys (32 bytes each), the roster site id that claims them and
    that site's signature (:mod:`fedfusion.common.secagg.signing`); empty in unsigned rounds."""

    encryption_key: bytes
    mask_key: bytes
    site_id: str = ""
    signature: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        return {"encryption-key": self.encryption_key, "mask-key": self.mask_key, "site-id": self.site_id,
                "signature": self.signature}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdvertisedKeys:
        return cls(bytes(data["encryption-key"]), bytes(data["mask-key"]), str(data.get("site-id", "")),
                   bytes(data.get("signature", b"")))


@dataclass(frozen=True)
class MaskedInput:
    """Stage 3 result at a site. Send only ``vector``; ``clipped`` (update entries clipped to the
    range) is for the site's own audit log."""

    vector: np.ndarray
    clipped: int


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4 request: which nodes' masked inputs are in the sum (``survivors``) and which shared
    keys but sent no masked input (``dropped``). The same request goes to every survivor."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"survivors": list(self.survivors), "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnmaskRequest:
        return cls(tuple(int(n) for n in data["survivors"]), tuple(int(n) for n in data["dropped"]))


@dataclass(frozen=True)
class UnmaskReply:
    """Stage 4 reply: serialised Shamir shares, by the node whose secret they share."""

    self_mask_shares: dict[int, bytes] = field(default_factory=dict)
    mask_key_shares: dict[int, bytes] = field(default_factory=dict)

    def to_dict(self) -> dict[str, bytes]:
        """``b-<node>`` / ``s-<node>`` keys: a flat ConfigRecord."""
        out = {f"b-{node}": share for node, share in self.self_mask_shares.items()}
        out.update({f"s-{node}": share for node, share in self.mask_key_shares.items()})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnmaskReply:
        b = {int(k[2:]): bytes(v) for k, v in data.items() if k.startswith("b-")}
        s = {int(k[2:]): bytes(v) for k, v in data.items() if k.startswith("s-")}
        return cls(b, s)


def bundles_to_dict(bundles: Mapping[int, bytes]) -> dict[str, bytes]:
    """Node-id-keyed ciphertexts (stage 2 and 3 payloads) with ``str`` keys for a ConfigRecord."""
    return {str(node): ct for node, ct in bundles.items()}


def bundles_from_dict(data: Mapping[str, Any]) -> dict[int, bytes]:
    return {int(node): bytes(ct) for node, ct in data.items()}


@dataclass(frozen=True)
class AggregateResult:
    """The only thing the server learns: per-parameter weighted sums and per-group weight sums over
    ``survivors`` (in the caller's units: ``sum_i w_ig * x_i`` and ``sum_i w_ig``)."""

    sums: dict[str, np.ndarray]
    weight_sums: dict[str, float]
    groups: dict[str, str]
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def averages(self) -> dict[str, np.ndarray]:
        """Weighted average of each parameter whose group has a positive weight sum; parameters of
        groups no surviving site had are left out (the caller keeps its current values)."""
        return {
            name: total / self.weight_sums[self.groups[name]]
            for name, total in self.sums.items()
            if self.weight_sums[self.groups[name]] > 0
        }
