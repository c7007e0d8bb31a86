"""The federation roster: which sites exist and the public key each one signs with.

Why it exists: the coordinator relays every message between sites, so anything a site learns about
its peers through the coordinator (node ids, advertised secure-aggregation keys, the survivor set)
could be invented by the coordinator. A site therefore trusts only peers named in a roster it holds
itself (shipped in its kit by ``fedfusion provision``, or approved by the site), and only statements
signed with the private key that the roster lists for that peer.

The signing key is the site's own node-authentication key (``[auth] private-key`` in site.toml,
OpenSSH ECDSA P-256): it never leaves the site, and its public half is what the coordinator
registered with the SuperLink, so one key proves a site's identity to the SuperLink and to its peers.

File format (JSON, UTF-8)::

    {"format": "fedfusion-roster/1",
     "sites": {"st-marys": "ecdsa-sha2-nistp256 AAAA... st-marys", "charite": "ecdsa-sha2-nistp256 ..."}}

Signatures are ECDSA P-256 with SHA-256 over ``DOMAIN || purpose || 0x00 || payload``: the purpose
label keeps a signature made for one protocol step from being replayed as another.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROSTER_FORMAT = "fedfusion-roster/1"
ROSTER_FILENAME = "roster.json"
_DOMAIN = b"fedfusion/roster-signature/v1\x00"


class RosterError(ValueError):
    """A roster that cannot be trusted or read; the message names the file and what is wrong."""


def _public_key(line: str, where: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, TypeError) as err:  # cryptography raises ValueError on a malformed line
        raise RosterError(f"{where}: not an OpenSSH public key line ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise RosterError(f"{where}: expected an ECDSA P-256 key (ecdsa-sha2-nistp256), got {type(key).__name__}")
    return key


@dataclass(frozen=True)
class Roster:
    """Site id -> public signing key; ``fingerprint`` identifies the roster as a whole (sites compare it)."""

    keys: Mapping[str, ec.EllipticCurvePublicKey]
    fingerprint: str
    source: str = "<memory>"

    @classmethod
    def from_lines(cls, lines: Mapping[str, str], source: str = "<memory>") -> Roster:
        if not lines:
            raise RosterError(f"{source}: the roster names no site")
        keys = {str(site): _cached_public_key(line, f"{source}: site {site!r}") for site, line in lines.items()}
        canonical = json.dumps({s: " ".join(lines[s].split()[:2]) for s in sorted(lines)}, sort_keys=True)
        return cls(keys=keys, fingerprint=hashlib.sha256(canonical.encode()).hexdigest(), source=source)

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RosterError(f"{path}: roster file not found (the site kit ships roster.json)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RosterError(f"{path}: not a UTF-8 JSON roster ({err})") from None
        if not isinstance(raw, dict) or raw.get("format") != ROSTER_FORMAT or not isinstance(raw.get("sites"), dict):
            raise RosterError(f'{path}: expected {{"format": "{ROSTER_FORMAT}", "sites": {{SITE: PUBLIC_KEY}}}}')
        return cls.from_lines({str(k): str(v) for k, v in raw["sites"].items()}, source=str(path))

    def site_of(self, public_key: ec.EllipticCurvePublicKey) -> str | None:
        """The roster's site id for this key, or None when the key is not on the roster."""
        wanted = _raw(public_key)
        return next((site for site, key in self.keys.items() if _raw(key) == wanted), None)

    def verify(self, site: str, purpose: str, payload: bytes, signature: bytes) -> bool:
        """True only when ``site`` is on the roster and signed exactly this purpose and payload."""
        key = self.keys.get(site)
        if key is None:
            return False
        try:
            key.verify(signature, _DOMAIN + purpose.encode() + b"\x00" + payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


@functools.lru_cache(maxsize=1024)
def _cached_public_key(line: str, where: str) -> ec.EllipticCurvePublicKey:
    """:func:`_public_key`, parsed once per process: a site checks the roster in every secure-aggregation
    stage, and parsing each OpenSSH key again was a fixed cost of every message (the key is immutable)."""
    return _public_key(line, where)


def _raw(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def sign(private_key: ec.EllipticCurvePrivateKey, purpose: str, payload: bytes) -> bytes:
    """Sign ``payload`` for one protocol ``purpose`` (see the module docstring for the exact bytes)."""
    return private_key.sign(_DOMAIN + purpose.encode() + b"\x00" + payload, ec.ECDSA(hashes.SHA256()))


def load_signing_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """The site's OpenSSH ECDSA P-256 private key ([auth] private-key)."""
    path = Path(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise RosterError(f"{path}: private key not found") from None
    except (ValueError, TypeError) as err:
        raise RosterError(f"{path}: not an unencrypted OpenSSH private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise RosterError(f"{path}: expected an ECDSA P-256 key")
    return key


def write_roster(path: str | Path, lines: Mapping[str, str]) -> Roster:
    """Write a roster file (validated first, so a kit never ships one a site would refuse)."""
    path = Path(path)
    roster = Roster.from_lines(lines, source=str(path))
    payload = json.dumps({"format": ROSTER_FORMAT, "sites": {s: lines[s].strip() for s in sorted(lines)}}, indent=2)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(payload + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return roster
