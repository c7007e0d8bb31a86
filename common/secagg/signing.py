"""SecAgg+ against a malicious coordinator: signed key advertisements, the consistency round, site policy.

Why: the coordinator relays every message, so without signatures it can invent sites (run a round of
one real site plus sites it plays itself and read that site's update), re-label node ids, tell
different sites different survivor sets (on a sparse graph that reveals a victim's self-mask share at
some holders and its neighbours' mask keys at others), and pick a degree or threshold too low to be
safe. Bonawitz et al. 2017 (actively secure variant) close this with signatures from a PKI; here the
PKI is the federation roster (:mod:`fedfusion.common.roster`), the key each site signs with is its
node-authentication key.

Every step is a pure function of values the site holds, so the Flower handlers
(:mod:`fedfusion.client.secure_aggregation`) and the in-process reference round
(:mod:`fedfusion.common.secagg.simulate`) run the same checks:

1. Stage 1: ``check_round`` (site policy) before training; ``advertisement_signature`` signs
   (site id, node id, both X25519 keys, the round config's digest, the roster fingerprint).
2. Stage 2: ``verify_advertisements`` accepts the broadcast only if every entry is signed by a distinct
   roster site for the same config; it returns node id -> site id (a signed binding the server cannot
   re-label).
3. Consistency round (between masked input and unmask): each site signs the one unmask request it was
   told (``survivors_signature``) and signs no other this round.
4. Stage 4: ``verify_survivor_signatures`` reveals only when more than half of the round's sites (and
   at least ``threshold``) signed exactly that request. Honest sites sign once, so two different
   requests can never both reach a majority: every revealing site saw the same survivor set.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedfusion.common.roster import Roster, sign
from fedfusion.common.secagg.config import MIN_SITES, SecAggConfig
from fedfusion.common.secagg.errors import ProtocolViolation
from fedfusion.common.secagg.graph import default_degree
from fedfusion.common.secagg.messages import AdvertisedKeys, UnmaskRequest

PURPOSE_ADVERTISE = "secagg/advertise-keys"
PURPOSE_SURVIVORS = "secagg/survivor-set"
DEFAULT_MIN_THRESHOLD_FRACTION = 2 / 3
"""Default site minimum for ``threshold / (degree + 1)``: Bonawitz et al.'s two thirds, the library default."""


@dataclass(frozen=True)
class SitePolicy:
    """What this site accepts in a secure round, whatever the coordinator asks (``[secure-aggregation]``
    in site.toml).

    ``min_sites``: fewest sites in a round and in an unmasked sum (3: with 2, each learns the other's
    update). ``allow_two_sites``: lowers that to 2, only from the site's own config; the run config's
    ``secagg-allow-two-sites`` alone is refused. ``min_degree``: fewest neighbours per site, 0 = the
    library default for the round's size (complete graph up to 10 sites, ~3 log2 n above), always capped
    at n - 1; a lower degree makes sums over small neighbourhoods recoverable. ``min_threshold_fraction``:
    the threshold must be at least this fraction of the degree + 1 share holders (and a strict majority).
    """

    min_sites: int = MIN_SITES
    allow_two_sites: bool = False
    min_degree: int = 0
    min_threshold_fraction: float = DEFAULT_MIN_THRESHOLD_FRACTION

    def __post_init__(self) -> None:
        if self.min_sites < 2:
            raise ValueError(f"[secure-aggregation] min-sites must be >= 2, got {self.min_sites}")
        if self.min_degree < 0:
            raise ValueError(f"[secure-aggregation] min-degree must be >= 0 (0 = library default), "
                             f"got {self.min_degree}")
        if not 0.5 <= self.min_threshold_fraction <= 1:
            raise ValueError("[secure-aggregation] min-threshold must be a fraction of the share holders in "
                             f"0.5..1, got {self.min_threshold_fraction}")

    @property
    def fewest_sites(self) -> int:
        return 2 if self.allow_two_sites else max(self.min_sites, MIN_SITES)

    def required_degree(self, num_sites: int) -> int:
        return min(num_sites - 1, self.min_degree or default_degree(num_sites))

    def required_threshold(self, degree: int) -> int:
        holders = degree + 1
        return max(holders // 2 + 1, math.ceil(self.min_threshold_fraction * holders - 1e-9))


def check_round(config: SecAggConfig, policy: SitePolicy) -> None:
    """Refuse (``ProtocolViolation``) a round the site's policy forbids, before anything is trained."""
    n = len(config.node_ids)
    if n < policy.fewest_sites or (config.allow_two_sites and not policy.allow_two_sites):
        raise ProtocolViolation(
            f"the coordinator asks for a secure round of {n} sites"
            + (" with allow-two-sites" if config.allow_two_sites else "")
            + f"; this site's policy needs at least {policy.fewest_sites} (set allow-two-sites = true in "
            "site.toml [secure-aggregation] only for a test bed)")
    need = policy.required_degree(n)
    if config.degree < need:
        raise ProtocolViolation(f"the coordinator asks for graph degree {config.degree} with {n} sites; this site's "
                                f"policy needs at least {need} ([secure-aggregation] min-degree)")
    need = policy.required_threshold(config.degree)
    if config.threshold < need:
        raise ProtocolViolation(f"the coordinator asks for threshold {config.threshold} of {config.degree + 1} share "
                                f"holders; this site's policy needs at least {need} ([secure-aggregation] "
                                "min-threshold)")
    if config.threshold > config.degree + 1:
        raise ProtocolViolation("the threshold exceeds the number of share holders")


def config_digest(config: SecAggConfig) -> bytes:
    """SHA-256 of the round's public parameters (node ids, context, graph seed, degree, threshold, ...)."""
    record = {k: v.hex() if isinstance(v, bytes) else v for k, v in config.to_record().items()}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()


def _canonical(values: list[Any]) -> bytes:
    return json.dumps(values, separators=(",", ":")).encode()


def advertisement_payload(site_id: str, node_id: int, keys: AdvertisedKeys, config: SecAggConfig,
                          roster_fingerprint: str) -> bytes:
    return _canonical([site_id, int(node_id), keys.encryption_key.hex(), keys.mask_key.hex(),
                       config_digest(config).hex(), roster_fingerprint])


def advertisement_signature(key: ec.EllipticCurvePrivateKey, site_id: str, node_id: int, keys: AdvertisedKeys,
                            config: SecAggConfig, roster: Roster) -> bytes:
    """This site's signature binding its round keys to its site id, node id, the round and the roster."""
    return sign(key, PURPOSE_ADVERTISE, advertisement_payload(site_id, node_id, keys, config, roster.fingerprint))


def verify_advertisements(roster: Roster, config: SecAggConfig, keys: Mapping[int, AdvertisedKeys],
                          own_node: int, own_site: str, policy: SitePolicy) -> dict[int, str]:
    """Node id -> roster site id for every advertised entry, or ``ProtocolViolation`` naming the first
    entry that is unsigned, signed by a site not on the roster, signed for another round/config/roster,
    or a second entry for one site; also refuses fewer distinct sites than the policy allows."""
    sites: dict[int, str] = {}
    for node, adv in sorted(keys.items()):
        if not adv.site_id or not adv.signature:
            raise ProtocolViolation(f"node {node}'s keys are not signed: refusing to share with an unattested peer")
        if adv.site_id not in roster.keys:
            raise ProtocolViolation(f"node {node} claims site {adv.site_id!r}, which is not on this site's roster "
                                    f"({roster.source}): refusing the round")
        payload = advertisement_payload(adv.site_id, node, adv, config, roster.fingerprint)
        if not roster.verify(adv.site_id, PURPOSE_ADVERTISE, payload, adv.signature):
            raise ProtocolViolation(f"node {node}'s keys carry no valid signature of site {adv.site_id!r} for this "
                                    "round (forged, re-labelled, or another round's config or roster)")
        sites[node] = adv.site_id
    if len(set(sites.values())) != len(sites):
        dup = sorted({s for s in sites.values() if list(sites.values()).count(s) > 1})
        raise ProtocolViolation(f"site(s) {dup[:5]} advertised keys under more than one node id: refusing the round")
    if sites.get(own_node) != own_site:
        raise ProtocolViolation("this site's own signed keys are missing from the broadcast or re-labelled")
    if len(sites) < policy.fewest_sites:
        raise ProtocolViolation(f"only {len(sites)} attested sites take part; this site's policy needs at least "
                                f"{policy.fewest_sites}")
    return sites


def request_digest(config: SecAggConfig, request: UnmaskRequest) -> bytes:
    """What a site signs in the consistency round: the round's config and the exact unmask request."""
    return hashlib.sha256(_canonical([config_digest(config).hex(), sorted(request.survivors),
                                      sorted(request.dropped)])).digest()


def survivors_signature(key: ec.EllipticCurvePrivateKey, config: SecAggConfig, request: UnmaskRequest) -> bytes:
    return sign(key, PURPOSE_SURVIVORS, request_digest(config, request))


def required_signers(config: SecAggConfig) -> int:
    """More than half the round's sites (so two different requests cannot both be vouched for by
    honest sites, each of which signs once) and at least the threshold."""
    return max(config.threshold, len(config.node_ids) // 2 + 1)


def verify_survivor_signatures(roster: Roster, config: SecAggConfig, request: UnmaskRequest,
                               sites: Mapping[int, str], signatures: Mapping[int, bytes]) -> int:
    """Count the distinct attested survivors that signed exactly ``request``; ``ProtocolViolation`` when
    fewer than :func:`required_signers` did (the site must then reveal nothing)."""
    digest = request_digest(config, request)
    signers = {sites[node] for node, sig in signatures.items()
               if node in request.survivors and node in sites
               and roster.verify(sites[node], PURPOSE_SURVIVORS, digest, bytes(sig))}
    need = required_signers(config)
    if len(signers) < need:
        raise ProtocolViolation(f"only {len(signers)} sites signed the survivor set this site was given, {need} "
                                "must (consistency check): the coordinator may be showing sites different sets; "
                                "refusing to reveal any share")
    return len(signers)
