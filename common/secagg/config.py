"""One round's public secure-aggregation parameters, chosen by the server and checked by every site.

Threshold: each site's two secrets are Shamir-shared among its *share holders*, its graph
neighbours plus itself (k + 1 holders). ``t`` holders must answer to recover a secret, so a round
survives up to ``k + 1 - t`` dropouts per neighbourhood. Safety needs ``2t > k + 1``: every holder
reveals, per node, either the self-mask share or the mask-key share, never both, so with a strict
majority needed for each a server can never collect enough of both for one node. The default
``t = ceil(2(k + 1) / 3)`` (at least a strict majority) is Bonawitz et al.'s choice, which also
resists a server colluding with up to a third of the holders.

Minimum sites: a sum over two sites lets each subtract its own update and read the other's (the
global model is sent back to every site). Configurations with fewer than 3 sites are refused
unless ``allow_two_sites=True``, and the same minimum applies to the survivors whose sum is
unmasked: the sites themselves refuse to unmask a smaller sum.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fedfusion.common.secagg.graph import DEFAULT_COMPLETE_UP_TO, build_graph, default_degree
from fedfusion.common.secagg.layout import VectorLayout, WeightedEncoder
from fedfusion.common.secagg.quantize import FixedPointCodec

MIN_SITES = 3
"""Fewest sites a secure sum may contain without the explicit two-site override."""
DEFAULT_BITS = 32
"""Modulus bits: 32 makes the masked vector as large as the float32 update."""
DEFAULT_WEIGHT_BOUND = 100_000.0
"""Default largest example count a site may report (per parameter group)."""


def default_threshold(degree: int) -> int:
    """``ceil(2/3)`` of the ``degree + 1`` share holders, and always a strict majority of them."""
    holders = degree + 1
    return max(holders // 2 + 1, math.ceil(2 * holders / 3))


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one round; build with ``create``, ship with ``to_record``.

    ``context`` is a fresh random round id bound into every key derivation and ciphertext, so
    nothing from one round can be replayed in another. ``value_bits`` None means the finest
    quantisation the modulus allows.
    """

    node_ids: tuple[int, ...]
    context: bytes
    graph_seed: bytes
    degree: int
    threshold: int
    clip: float
    weight_bound: float
    layout_digest: str
    bits: int = DEFAULT_BITS
    value_bits: int | None = None
    allow_two_sites: bool = False

    @classmethod
    def create(
        cls,
        node_ids: Sequence[int],
        layout: VectorLayout,
        *,
        clip: float,
        weight_bound: float = DEFAULT_WEIGHT_BOUND,
        bits: int = DEFAULT_BITS,
        value_bits: int | None = None,
        degree: int | None = None,
        threshold: int | None = None,
        complete_up_to: int = DEFAULT_COMPLETE_UP_TO,
        allow_two_sites: bool = False,
        context: bytes | None = None,
        graph_seed: bytes | None = None,
    ) -> SecAggConfig:
        """Server side: fill in the graph degree, threshold, fresh context and graph seed.

        ``allow_two_sites``: with 2 sites each site can subtract its own update from the sum and
        learn the other's exactly; only set it when that is acceptable (e.g. a test bed).
        """
        ids = tuple(sorted(int(n) for n in node_ids))
        if degree is None:
            degree = default_degree(len(ids), complete_up_to) if len(ids) >= 2 else 1
        return cls(
            node_ids=ids,
            context=secrets.token_bytes(16) if context is None else context,
            graph_seed=secrets.token_bytes(16) if graph_seed is None else graph_seed,
            degree=degree,
            threshold=default_threshold(degree) if threshold is None else threshold,
            clip=clip,
            weight_bound=weight_bound,
            layout_digest=layout.digest(),
            bits=bits,
            value_bits=value_bits,
            allow_two_sites=allow_two_sites,
        )

    def __post_init__(self) -> None:
        n = len(self.node_ids)
        if len(set(self.node_ids)) != n or list(self.node_ids) != sorted(self.node_ids):
            raise ValueError("node_ids must be distinct and sorted")
        if n < 2 or (n < MIN_SITES and not self.allow_two_sites):
            raise ValueError(
                f"secure aggregation needs at least {MIN_SITES} sites, got {n}: with 2 sites each site can "
                "subtract its own update from the sum and learn the other's (override: allow_two_sites=True)"
            )
        if not 1 <= self.degree <= n - 1:
            raise ValueError(f"degree must be in 1..{n - 1} for {n} sites, got {self.degree}")
        holders = self.degree + 1
        if not (2 * self.threshold > holders and self.threshold <= holders):
            raise ValueError(
                f"threshold must be a strict majority of the {holders} share holders (degree + 1) and at most "
                f"{holders}, i.e. in {holders // 2 + 1}..{holders}; got {self.threshold}"
            )
        if len(self.context) < 8:
            raise ValueError("the round context must be at least 8 random bytes")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        if not (math.isfinite(self.weight_bound) and self.weight_bound > 0):
            raise ValueError(f"weight_bound must be a positive finite number, got {self.weight_bound}")
        # Build the codec and graph now, so a modulus too small for n sites or an impossible degree
        # fails at the server before any key exists, not at a site mid-round.
        FixedPointCodec(-self.clip, self.clip, n, self.bits, self.value_bits)
        _ = self.neighbours

    @cached_property
    def neighbours(self) -> dict[int, frozenset[int]]:
        """The round's communication graph (every site computes the same one from the seed)."""
        return build_graph(self.node_ids, self.degree, self.graph_seed)

    def holders(self, node_id: int) -> frozenset[int]:
        """Who holds shares of ``node_id``'s secrets: its neighbours and itself."""
        return self.neighbours[node_id] | {node_id}

    @property
    def min_survivors(self) -> int:
        """Fewest masked inputs whose sum may be unmasked."""
        return max(self.threshold, 2 if self.allow_two_sites else MIN_SITES)

    def encoder(self, layout: VectorLayout) -> WeightedEncoder:
        """The quantiser for ``layout``; refuses a layout other than the one the server announced."""
        if layout.digest() != self.layout_digest:
            raise ValueError("the model layout differs from the server's (another model version or parameter groups)")
        return WeightedEncoder(
            layout,
            clip=self.clip,
            weight_bound=self.weight_bound,
            num_sites=len(self.node_ids),
            bits=self.bits,
            value_bits=self.value_bits,
        )

    def to_record(self) -> dict[str, Any]:
        """Flat, hyphenated values that fit a Flower ConfigRecord (ints, floats, str, bytes, bool, lists)."""
        return {
            "node-ids": list(self.node_ids),
            "context": self.context,
            "graph-seed": self.graph_seed,
            "degree": self.degree,
            "threshold": self.threshold,
            "clip": self.clip,
            "weight-bound": self.weight_bound,
            "layout-digest": self.layout_digest,
            "bits": self.bits,
            "value-bits": self.value_bits or 0,
            "allow-two-sites": self.allow_two_sites,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SecAggConfig:
        """Inverse of ``to_record`` (validates everything again at the site)."""
        return cls(
            node_ids=tuple(int(n) for n in record["node-ids"]),
            context=bytes(record["context"]),
            graph_seed=bytes(record["graph-seed"]),
            degree=int(record["degree"]),
            threshold=int(record["threshold"]),
            clip=float(record["clip"]),
            weight_bound=float(record["weight-bound"]),
            layout_digest=str(record["layout-digest"]),
            bits=int(record["bits"]),
            value_bits=int(record["value-bits"]) or None,
            allow_two_sites=bool(record["allow-two-sites"]),
        )
