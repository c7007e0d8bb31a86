"""``fedfusion provision``: the federation's CA, the SuperLink certificate and one key pair per site.

Flower 1.41 secures a deployment with two independent mechanisms, and a kit carries both:

- **TLS (server authentication).** The SuperLink serves HTTPS with a certificate signed by the
  federation CA (``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile``); every site
  checks it against ``ca.pem`` (``flower-supernode --root-certificates``). Sites hold no TLS
  certificate of their own: Flower has no mutual TLS.
- **SuperNode authentication.** Each site signs every Fleet API request with its own EC key
  (``flower-supernode --auth-supernode-private-key``, an OpenSSH-format private key on a NIST
  curve); a SuperLink started with ``--enable-supernode-auth`` accepts only public keys that were
  registered through its Control API (``flwr supernode register KEY.pub``). fedfusion registers
  the keys under ``coordinator/sites/`` when ``fedfusion coordinator start --kit`` starts.

Layout written under ``--out`` (folders 0700, private keys 0600)::

    README.md                  what goes where
    ca/ca.pem, ca/ca.key       the CA; keep ca.key offline (only needed to issue a new certificate)
    coordinator/ca.pem         the CA certificate
    coordinator/server.pem     SuperLink certificate: SANs for every --superlink-host + localhost/127.0.0.1/::1
    coordinator/server.key     its private key
    coordinator/sites/ID.pub   each authorised site's public key (OpenSSH), registered at start
    coordinator/roster.json    every site's public key (common/roster.py), the same file as in each site kit
    ID/ca.pem, ID/site.key, ID/site.pub, ID/site.toml, ID/roster.json, ID/README.md   one kit per site

With ``site_keys`` (``--site-keys DIR``: ``DIR/ID.pub`` made by the site with ``fedfusion site keygen``)
a kit carries no private key at all: the site keeps the one it generated. This is the recommended path;
otherwise the coordinator generates each site's key and must hand it over securely. The site.toml of
every kit is safe by default (server/kit_files.py): approval, masking, DP budgets and the roster on.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfusion.common.roster import ROSTER_FILENAME, RosterError, write_roster
from fedfusion.server.kit_files import SITE_KEY, SITE_PUB, site_readme, site_toml, top_readme

DEFAULT_PORT = 9092
DEFAULT_DAYS = 825
CA_MIN_DAYS = 3650
# Flower 1.41 accepts any NIST curve for SuperNode keys (flwr/supercore/primitives/asymmetric.py,
# uses_nist_ec_curve); P-256 keeps keys short and matches the TLS keys below.
SITE_KEY_CURVE = ec.SECP256R1()
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
RESERVED_NAMES = frozenset({"ca", "coordinator", "sites"})
_SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")



class ProvisionError(ValueError):
    """Provisioning cannot go on; the message says what to change (flag, folder, name)."""


@dataclass(frozen=True)
class KitLayout:
    """Where ``provision`` puts each file under the output folder (one place, so tests and the
    coordinator agree with what was written)."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    @property
    def authorised_keys(self) -> Path:
        return self.coordinator / "sites"

    def site(self, site_id: str) -> Path:
        return self.root / site_id


# --- names and addresses --------------------------------------------------------------------------


def parse_sites(text: str | Sequence[str]) -> list[str]:
    """``a,b,c`` (or a list) as validated, unique site ids: they become folder and file names."""
    items = text.split(",") if isinstance(text, str) else [s for part in text for s in part.split(",")]
    sites = [s.strip() for s in items if s.strip()]
    if not sites:
        raise ProvisionError("--sites is empty: give the site ids, e.g. --sites st-marys,charite,ucl")
    for site in sites:
        if not _SITE_ID.fullmatch(site):
            raise ProvisionError(f"site id {site!r} is not usable as a folder name: use letters, digits, '.', "
                                 "'_' and '-' (at most 64, starting with a letter or digit)")
        if site.lower() in RESERVED_NAMES:
            raise ProvisionError(f"site id {site!r} is reserved for the kit layout; choose another name")
    duplicates = sorted({s for s in sites if sites.count(s) > 1})
    if duplicates:
        raise ProvisionError(f"site ids given more than once: {', '.join(duplicates)}")
    return sites


def san_entry(host: str) -> x509.GeneralName:
    """An IP address becomes an IP SAN, anything else must be a valid DNS name (TLS clients match
    IP literals only against IP SANs, so the choice matters)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host or "/" in host:
        raise ProvisionError(f"--superlink-host {host!r}: give a bare host name or IP address, without port or "
                             "scheme (the port is --port)")
    name = host.rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ProvisionError(f"--superlink-host {host!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(name.lower())


def superlink_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """SANs for the SuperLink: the given hosts first, then the local names the coordinator itself
    uses (``fedfusion run`` and the SuperLink's own ServerApp processes connect over loopback)."""
    names: list[x509.GeneralName] = []
    for host in [*hosts, *LOCAL_NAMES]:
        entry = san_entry(host)
        if entry not in names:
            names.append(entry)
    return names


def client_address(host: str, port: int) -> str:
    """``host:port`` as Flower parses it (IPv6 literals in brackets)."""
    entry = san_entry(host)
    if isinstance(entry, x509.IPAddress) and entry.value.version == 6:
        return f"[{entry.value}]:{port}"
    return f"{entry.value}:{port}"


# --- keys and certificates ------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfusion federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "fedfusion federation CA", days: int = CA_MIN_DAYS,
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA allowed to sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str],
                            days: int = DEFAULT_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate: serverAuth, SANs for ``hosts`` plus the loopback names."""
    if not hosts:
        raise ProvisionError("give at least one --superlink-host: the name or address sites connect to")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    first = san_entry(hosts[0]).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(first))).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(superlink_names(hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_site_key() -> tuple[bytes, bytes]:
    """A site's SuperNode key pair as (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(SITE_KEY_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public


# --- writing --------------------------------------------------------------------------------------


def _mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write(path: Path, data: bytes | str, *, private: bool = False) -> None:
    """Create ``path`` with its final permissions from the first byte (a key is never world-readable,
    not even for an instant); an existing file is replaced (callers decided that with --force)."""
    payload = data.encode() if isinstance(data, str) else data
    if path.exists() or path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(payload)
    os.chmod(path, 0o600 if private else 0o644)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _occupied(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@dataclass(frozen=True)
class ProvisionResult:
    root: Path
    sites: tuple[str, ...]
    hosts: tuple[str, ...]
    roster_fingerprint: str = ""  # what every site compares when it installs roster.json
    own_keys: tuple[str, ...] = ()  # sites whose kit holds no private key (they made their own)
    roster_sites: tuple[str, ...] = ()  # every site on the roster written now


def site_public_keys(folder: Path, site_ids: Sequence[str] | None) -> dict[str, bytes]:
    """``folder/ID.pub`` for each site (every ``*.pub`` when ``site_ids`` is None), as OpenSSH lines.

    The roster and secure aggregation sign with ECDSA P-256 (common/roster.py), so any other key is
    refused here, before anything is written, with the command that makes a usable one.
    """
    if not folder.is_dir():
        raise ProvisionError(f"--site-keys {folder}: no such folder (expected one SITE.pub per site, "
                             "each from that site's `fedfusion site keygen`)")
    ids = list(site_ids) if site_ids is not None else sorted(f.name.removesuffix(".pub") for f in folder.glob("*.pub"))
    missing = [s for s in ids if not (folder / f"{s}.pub").is_file()]
    if missing or not ids:
        raise ProvisionError(f"--site-keys {folder}: no public key for {', '.join(missing) or 'any site'}; expected "
                             f"{', '.join(f'{s}.pub' for s in missing) or 'SITE.pub files'} (the site.pub each site's "
                             "`fedfusion site keygen` wrote, renamed to its site id)")
    keys = {}
    for site in ids:
        path = folder / f"{site}.pub"
        key = load_site_public_key(path)
        if not isinstance(key.curve, ec.SECP256R1):
            raise ProvisionError(f"{path}: the federation roster needs an ECDSA P-256 key (ecdsa-sha2-nistp256), got "
                                 f"{key.curve.name}; make one with `fedfusion site keygen --out DIR` "
                                 "(or `ssh-keygen -t ecdsa -b 256`)")
        keys[site] = path.read_bytes().strip() + b"\n"
    return keys


def _write_rosters(layout: KitLayout) -> tuple[str, tuple[str, ...]]:
    """roster.json from every key in ``coordinator/sites/``, into the coordinator kit and every site kit
    found under the output folder; returns the roster's fingerprint and its sites."""
    lines = {f.name.removesuffix(".pub"): f.read_text().strip() for f in sorted(layout.authorised_keys.glob("*.pub"))}
    try:
        roster = write_roster(layout.coordinator / ROSTER_FILENAME, lines)
    except RosterError as err:
        raise ProvisionError(f"cannot write the federation roster: {err}") from None
    for site in lines:
        if (layout.site(site) / "site.toml").is_file():
            write_roster(layout.site(site) / ROSTER_FILENAME, lines)
    return roster.fingerprint, tuple(sorted(lines))


def provision(out: Path, sites: str | Sequence[str] | None, hosts: Sequence[str], *, port: int = DEFAULT_PORT,
              days: int = DEFAULT_DAYS, schema: Path | None = None, force: bool = False,
              add: bool = False, approved_apps: Sequence[str] = (), site_keys: Path | None = None,
              ) -> ProvisionResult:
    """Write a federation's kits under ``out`` (see the module docstring for the layout).

    ``sites`` is ``"a,b,c"`` or a list of ids (None: every ``SITE.pub`` in ``site_keys``).
    ``add`` adds site kits to an existing ``out`` (reusing its CA certificate; no CA key needed) and
    rewrites the roster of every kit there; ``force`` replaces existing kits instead of refusing:
    keys replaced on a running coordinator must be registered again and the old ones unregistered
    (``flwr supernode unregister``). ``approved_apps``: bundle hashes for ``[approval] apps`` (none:
    the kits refuse every bundle until the site adds one). ``site_keys``: a folder of ``SITE.pub``
    made by the sites themselves; those kits hold no private key.
    """
    if sites is None and site_keys is None:
        raise ProvisionError("give --sites (e.g. --sites st-marys,charite,ucl) or --site-keys DIR")
    site_ids = parse_sites(sites) if sites is not None else None
    own_keys = site_public_keys(site_keys, site_ids) if site_keys is not None else {}
    site_ids = site_ids if site_ids is not None else parse_sites(list(own_keys))
    if not 1 <= port <= 65535:
        raise ProvisionError(f"--port must be between 1 and 65535, got {port}")
    if days < 1:
        raise ProvisionError(f"--days must be at least 1, got {days}")
    if schema is not None and not schema.is_file():
        raise ProvisionError(f"--schema {schema}: no such file")
    host_list = [h.strip() for h in hosts if h.strip()]
    for host in host_list:
        san_entry(host)  # fail on a bad host before anything is written
    if not host_list:
        raise ProvisionError("give at least one --superlink-host: the name or address sites connect to")
    layout = KitLayout(out)
    address = client_address(host_list[0], port)

    if add:
        ca_pem_path = layout.coordinator / "ca.pem"
        if not ca_pem_path.is_file():
            raise ProvisionError(f"--add needs an existing kit folder: {ca_pem_path} not found")
        ca_pem = ca_pem_path.read_bytes()
        taken = [s for s in site_ids if _occupied(layout.site(s))]
        if taken and not force:
            raise ProvisionError(f"kits already exist for {', '.join(taken)} in {out}; pass --force to replace "
                                 "them (the coordinator must then register the new keys)")
    else:
        if _occupied(out) and not force:
            raise ProvisionError(f"{out} already holds files; refusing to overwrite a kit (its keys may be in use). "
                                 "Choose another --out, add sites with --add, or pass --force to replace it")
        if force and out.is_dir():
            for sub in [layout.ca_dir, layout.coordinator, *(layout.site(s) for s in site_ids)]:
                if sub.is_dir():
                    shutil.rmtree(sub)
        _mkdir_private(out)
        ca_key, ca_cert = make_ca(days=max(days, CA_MIN_DAYS))
        server_key, server_cert = make_server_certificate(ca_key, ca_cert, host_list, days=days)
        ca_pem = _pem(ca_cert)
        _mkdir_private(layout.ca_dir)
        _write(layout.ca_dir / "ca.pem", ca_pem)
        _write(layout.ca_dir / "ca.key", _key_pem(ca_key), private=True)
        _mkdir_private(layout.coordinator)
        _write(layout.coordinator / "ca.pem", ca_pem)
        _write(layout.coordinator / "server.pem", _pem(server_cert) + ca_pem)
        _write(layout.coordinator / "server.key", _key_pem(server_key), private=True)
        if schema is not None:
            _write(layout.coordinator / "schema.json", schema.read_bytes())
        _write(out / "README.md", top_readme(site_ids, host_list, port))

    _mkdir_private(layout.authorised_keys)
    for site_id in site_ids:
        folder = layout.site(site_id)
        if folder.is_dir():
            shutil.rmtree(folder)
        _mkdir_private(folder)
        own = site_id in own_keys
        if own:  # the site made its key pair: only the public half ever reaches the coordinator
            public_line = own_keys[site_id]
        else:
            private, public = make_site_key()
            public_line = public + f" fedfusion-site-{site_id}\n".encode()
            _write(folder / SITE_KEY, private, private=True)
        _write(folder / "ca.pem", ca_pem)
        _write(folder / SITE_PUB, public_line)
        _write(folder / "site.toml", site_toml(site_id, address, schema="schema.json" if schema else None,
                                               approved_apps=approved_apps, own_key=own))
        if schema is not None:
            _write(folder / "schema.json", schema.read_bytes())
        _write(folder / "README.md", site_readme(site_id, address, ca_pem, public_line, schema is not None,
                                                 own_key=own))
        _write(layout.authorised_keys / f"{site_id}.pub", public_line)
    roster_fingerprint, roster_sites = _write_rosters(layout)
    if add:  # the overview lists every kit in the folder, old and new
        _write(out / "README.md", top_readme(list(roster_sites), host_list, port))
    return ProvisionResult(root=out, sites=tuple(site_ids), hosts=tuple(host_list),
                           roster_fingerprint=roster_fingerprint, own_keys=tuple(s for s in site_ids if s in own_keys),
                           roster_sites=roster_sites)


def authorised_site_keys(path: Path) -> dict[str, Path]:
    """Site id → public key file from a coordinator kit (``KIT/sites/*.pub``), a folder of ``*.pub``
    files, or one ``.pub`` file; the site id is the file name without ``.pub``."""
    if path.is_file():
        files = [path]
    elif (path / "sites").is_dir():
        files = sorted((path / "sites").glob("*.pub"))
    elif path.is_dir():
        files = sorted(path.glob("*.pub"))
    else:
        raise ProvisionError(f"{path}: no such file or folder (expected a coordinator kit or site .pub keys)")
    if not files:
        raise ProvisionError(f"{path}: no site public keys (*.pub) found; run 'fedfusion provision' first")
    return {f.name.removesuffix(".pub"): f for f in files}


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """An OpenSSH public key as Flower's ``flwr supernode register`` accepts it (EC, NIST curve)."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, OSError) as err:
        raise ProvisionError(f"{path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
            "secp256r1", "secp384r1", "secp521r1"):
        raise ProvisionError(f"{path}: Flower's node authentication needs an ECDSA key on a NIST curve "
                             "(e.g. `ssh-keygen -t ecdsa -b 384`), got another key type")
    return key
