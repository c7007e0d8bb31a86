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
    ID/ca.pem, ID/site.key, ID/site.pub, ID/site.toml, ID/README.md   one kit per site
"""

from __future__ import annotations

import datetime
import hashlib
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

SITE_KEY = "site.key"
SITE_PUB = "site.pub"


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


def fingerprint(data: bytes) -> str:
    """SHA-256 of a file's bytes, grouped for reading aloud when a site confirms its kit by phone."""
    digest = hashlib.sha256(data).hexdigest()
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


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


def site_toml(site_id: str, address: str, *, schema: str | None) -> str:
    """The site.toml template of a kit: TLS and node authentication filled in, data paths to edit."""
    schema_line = (f'schema = "{schema}"                        # the study\'s data contract (in this kit)'
                   if schema else 'schema = "/etc/fedfusion/schema.json"   # EDIT: schema.json from the coordinator')
    return f"""# site.toml for {site_id}, written by `fedfusion provision`.
# Relative paths resolve against this file's folder. Edit the lines marked EDIT, then:
#   fedfusion site check MANIFEST --schema SCHEMA && fedfusion site start site.toml
[site]
id = "{site_id}"
manifest = "/srv/fedfusion/manifest.csv"        # EDIT: your manifest (one row per patient)
{schema_line}
device = "auto"                                 # auto, cpu, cuda, cuda:1
# audit-log = "/var/lib/fedfusion/audit.jsonl"  # default: audit.jsonl beside this file

[coordinator]
address = "{address}"
root-certificates = "ca.pem"                    # the federation CA: the site checks the coordinator against it

[auth]
private-key = "{SITE_KEY}"                        # this site's SuperNode key (keep it 0600, never send it anywhere)
public-key = "{SITE_PUB}"                         # the coordinator registered this one; checked against private-key

[supernode]
port = 9094                                     # loopback only; one per SuperNode on a host
"""


def _site_readme(site_id: str, address: str, ca_pem: bytes, public_key: bytes, has_schema: bool) -> str:
    schema_line = "- `schema.json`: the study's data contract.\n" if has_schema else ""
    return f"""# fedfusion site kit: {site_id}

From the coordinator of the federation. Install it on the site host, readable only by the user that
runs `fedfusion site start` (the `fedfusion` service user): the folder 0700, `{SITE_KEY}` 0600.

- `ca.pem`: the federation CA certificate. The site accepts only a coordinator whose certificate this
  CA signed (TLS).
- `{SITE_KEY}`: **secret**, this site's private key (OpenSSH, ECDSA P-256). It proves to the coordinator
  that requests come from this site. Never copy it anywhere else; nobody else needs it.
- `{SITE_PUB}`: the matching public key. The coordinator has registered it.
- `site.toml`: the site config. Edit `manifest` (and `schema`), then start.
{schema_line}
The site connects **outbound** to `{address}` (HTTPS); nothing at the site listens on the network.

Confirm with the coordinator by phone that these fingerprints (SHA-256 of the files) match theirs:

- `ca.pem`: `{fingerprint(ca_pem)}`
- `{SITE_PUB}`: `{fingerprint(public_key)}`

Then:

```bash
fedfusion site check /srv/fedfusion/manifest.csv --schema schema.json
fedfusion site start site.toml
```

If the log says `Failed to activate SuperNode`, the coordinator has not registered `{SITE_PUB}`. If it
says `certificate verify failed`, `ca.pem` is not the CA of the coordinator at `{address}` (or a proxy
intercepts TLS). The full guide is docs/hospital-it.md.
"""


def _top_readme(sites: Sequence[str], hosts: Sequence[str], port: int) -> str:
    site_lines = "\n".join(f"- `{s}/`: to site `{s}` only, over a secure channel." for s in sites)
    return f"""# fedfusion kits

Written by `fedfusion provision` for the SuperLink at {', '.join(hosts)} (port {port}).

- `ca/`: to **nobody**. Keep `ca.key` offline (an encrypted USB stick, a vault); it is only needed to
  issue a new SuperLink certificate.
- `coordinator/`: to the coordinator host. `fedfusion coordinator start --kit coordinator/ ...` turns on
  TLS and node authentication and registers every key in `coordinator/sites/`.
{site_lines}

Adding a site later: `fedfusion provision --add --sites NEW --superlink-host {hosts[0]} --out THIS_FOLDER`,
copy `coordinator/sites/NEW.pub` to the coordinator and run `fedfusion coordinator register-sites` there
(or restart the coordinator).
"""


@dataclass(frozen=True)
class ProvisionResult:
    root: Path
    sites: tuple[str, ...]
    hosts: tuple[str, ...]


def provision(out: Path, sites: Sequence[str], hosts: Sequence[str], *, port: int = DEFAULT_PORT,
              days: int = DEFAULT_DAYS, schema: Path | None = None, force: bool = False,
              add: bool = False) -> ProvisionResult:
    """Write a federation's kits under ``out`` (see the module docstring for the layout).

    ``add`` adds site kits to an existing ``out`` (reusing its CA certificate; no CA key needed);
    ``force`` replaces existing kits instead of refusing: keys replaced on a running coordinator
    must be registered again and the old ones unregistered (``flwr supernode unregister``).
    """
    site_ids = parse_sites(list(sites))
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
        _write(out / "README.md", _top_readme(site_ids, host_list, port))

    _mkdir_private(layout.authorised_keys)
    for site_id in site_ids:
        folder = layout.site(site_id)
        if folder.is_dir():
            shutil.rmtree(folder)
        _mkdir_private(folder)
        private, public = make_site_key()
        public_line = public + f" fedfusion-site-{site_id}\n".encode()
        _write(folder / "ca.pem", ca_pem)
        _write(folder / SITE_KEY, private, private=True)
        _write(folder / SITE_PUB, public_line)
        _write(folder / "site.toml", site_toml(site_id, address, schema="schema.json" if schema else None))
        if schema is not None:
            _write(folder / "schema.json", schema.read_bytes())
        _write(folder / "README.md", _site_readme(site_id, address, ca_pem, public_line, schema is not None))
        _write(layout.authorised_keys / f"{site_id}.pub", public_line)
    if add:  # the overview lists every kit in the folder, old and new
        every_site = sorted(f.name.removesuffix(".pub") for f in layout.authorised_keys.glob("*.pub"))
        _write(out / "README.md", _top_readme(every_site, host_list, port))
    return ProvisionResult(root=out, sites=tuple(site_ids), hosts=tuple(host_list))


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
