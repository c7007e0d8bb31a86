"""The run-config side of secure aggregation: the flat ``secure-aggregation``/``secagg-*`` keys, parsed.

These are the coordinator's choices for every round of a run (the per-round ``SecAggConfig`` with
node ids, fresh context and graph seed is built from them by the server). Both Flower apps read
the same keys: the server to run the four stages, each site to refuse a plain (unmasked) training
request while ``enabled`` is true.

Also here: the names both apps use on the wire (message types, record keys), so the site's
handlers and the server's workflow cannot drift apart. Plain strings, no Flower import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedfusion.common.secagg.config import DEFAULT_BITS, DEFAULT_WEIGHT_BOUND
from fedfusion.common.secagg.masking import MAX_BITS, MIN_BITS

#: Message types of the four stages (Flower routes ``train.<action>`` to ``@app.train("<action>")``).
#: Stage 1 also trains: the site trains, keeps its update, and answers with public keys only.
ACTION_ADVERTISE_KEYS = "secagg_advertise_keys"
ACTION_SHARE_KEYS = "secagg_share_keys"
ACTION_MASKED_INPUT = "secagg_masked_input"
ACTION_CONSISTENCY = "secagg_consistency"  # each survivor signs the unmask request it was told
ACTION_UNMASK = "secagg_unmask"
STAGE_ACTIONS = (ACTION_ADVERTISE_KEYS, ACTION_SHARE_KEYS, ACTION_MASKED_INPUT, ACTION_CONSISTENCY, ACTION_UNMASK)

#: Record keys of the stage messages (server -> site) and replies (site -> server).
ROUND_KEY = "secagg-round"  # stage 1: SecAggConfig.to_record() + layout + weight keys
CONTEXT_KEY = "context"  # in every stage message: the round's context id, ties a stage to the round
LAYOUT_KEY = "layout"
WEIGHT_KEYS_KEY = "weight-keys"
PACKING_KEY = "packing"  # stage 1: the packed global model's slots (common/packing.py), no values
KEYS_KEY = "secagg-keys"  # stage 1 reply: this site's public keys; stage 2 message: everyone's
BUNDLES_KEY = "secagg-bundles"  # stage 2 reply: ciphertexts by recipient; stage 3 message: by sender
MASKED_KEY = "secagg-masked"  # stage 3 reply: ArrayRecord with the masked vector
MASKED_ARRAY = "masked-input"
REQUEST_KEY = "secagg-request"  # stage 4 message: the unmask request
SHARES_KEY = "secagg-shares"  # stage 4 reply: Shamir shares
SIGNATURE_KEY = "secagg-signature"  # consistency reply: this site's signature of the request ("signature")
SIGNATURES_KEY = "secagg-signatures"  # stage 4 message: "signers" (node ids) and their "signatures"

#: Layout entry in which each site puts its clipped fraction (times ``clip``), weighted by its example
#: count like every shared parameter: the server unmasks only the example-weighted mean over sites.
CLIPPED_ENTRY = "secagg/clipped-fraction"

DEFAULT_CLIP = 1.0
"""Default bound on each entry of a site's update (the change of each weight in one round)."""
DEFAULT_STAGE_TIMEOUT = 600.0
"""Seconds the server waits for the replies of stages 2-4 (stage 1 trains: it uses round-timeout)."""
TWO_SITES_HELP = "with 2 sites each site could subtract its own update from the sum and learn the other's"


@dataclass(frozen=True)
class SecureAggregationSettings:
    """``secure-aggregation`` and the ``secagg-*`` run-config keys.

    ``clip``: each entry of a site's update (new weights minus the global ones) is clipped to
    ``[-clip, clip]`` before quantisation; the count clipped is reported only as a federation-wide
    mean. ``bits``: the masking modulus (32 = the masked vector is as large as a float32 update).
    ``threshold``: share holders needed to recover a secret, 0 = the library default (two thirds).
    ``weight_bound``: the largest example count a site may report; the closer to the real counts,
    the finer the average. ``timeout``: seconds per key-exchange stage.
    """

    enabled: bool = False
    clip: float = DEFAULT_CLIP
    bits: int = DEFAULT_BITS
    threshold: int = 0
    allow_two_sites: bool = False
    weight_bound: float = DEFAULT_WEIGHT_BOUND
    timeout: float = DEFAULT_STAGE_TIMEOUT

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"secagg-clip must be a positive number, got {self.clip}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"secagg-bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")
        if self.threshold < 0:
            raise ValueError(f"secagg-threshold must be >= 0 (0 = default), got {self.threshold}")
        if not (math.isfinite(self.weight_bound) and self.weight_bound > 0):
            raise ValueError(f"secagg-weight-bound must be a positive number, got {self.weight_bound}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"secagg-timeout must be a positive number of seconds, got {self.timeout}")

    @classmethod
    def from_run_config(cls, flat: Mapping[str, Any]) -> SecureAggregationSettings:
        """Parse the flat keys (missing keys take the defaults)."""
        return cls(
            enabled=_flag(flat.get("secure-aggregation", False)),
            clip=float(flat.get("secagg-clip", DEFAULT_CLIP)),
            bits=int(flat.get("secagg-bits", DEFAULT_BITS)),
            threshold=int(flat.get("secagg-threshold", 0)),
            allow_two_sites=_flag(flat.get("secagg-allow-two-sites", False)),
            weight_bound=float(flat.get("secagg-weight-bound", DEFAULT_WEIGHT_BOUND)),
            timeout=float(flat.get("secagg-timeout", DEFAULT_STAGE_TIMEOUT)),
        )


def _flag(value: Any) -> bool:
    """A run-config boolean; ``--run-config 'k="false"'`` must not read as true."""
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("", "0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)
