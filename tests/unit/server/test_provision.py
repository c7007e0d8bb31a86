"""`fedfusion provision`: a CA whose SuperLink certificate verifies for every host sites use, one
OpenSSH ECDSA key per site that Flower's node authentication accepts, kits whose secrets only their
owner can read, and no kit silently overwritten."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedfusion.cli import main
from fedfusion.client.daemon import SiteConfig, check_auth_keys, supernode_command
from fedfusion.server.provision import (
    KitLayout,
    ProvisionError,
    authorised_site_keys,
    load_site_public_key,
    provision,
    san_entry,
)

SITES = ["st-marys", "charite", "ucl"]
HOSTS = ["coord.example.org", "10.1.2.3"]


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> KitLayout:
    out = tmp_path_factory.mktemp("provision") / "kits"
    provision(out, SITES, HOSTS, port=9443, days=30)
    return KitLayout(out)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify(kits: KitLayout, name: x509.GeneralName) -> None:
    """What a TLS client with the site's ca.pem does: chain, validity, serverAuth and SAN."""
    chain = x509.load_pem_x509_certificates((kits.coordinator / "server.pem").read_bytes())
    store = Store([_cert(kits.site("ucl") / "ca.pem")])
    verifier = PolicyBuilder().store(store).build_server_verifier(name)
    verifier.verify(chain[0], chain[1:])


@pytest.mark.parametrize("name", [x509.DNSName("coord.example.org"), x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
                                  x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
def test_superlink_certificate_verifies_against_the_kit_ca_for_every_host(kits: KitLayout,
                                                                          name: x509.GeneralName) -> None:
    _verify(kits, name)


def test_certificate_for_another_name_or_from_another_ca_does_not_verify(kits: KitLayout, tmp_path: Path) -> None:
    with pytest.raises(VerificationError):
        _verify(kits, x509.DNSName("evil.example.org"))
    other = KitLayout(provision(tmp_path / "other", ["x"], HOSTS).root)
    chain = x509.load_pem_x509_certificates((other.coordinator / "server.pem").read_bytes())
    verifier = PolicyBuilder().store(Store([_cert(kits.coordinator / "ca.pem")])).build_server_verifier(
        x509.DNSName("coord.example.org"))
    with pytest.raises(VerificationError):
        verifier.verify(chain[0], chain[1:])


def test_certificate_extensions_sans_and_validity(kits: KitLayout) -> None:
    ca, server = _cert(kits.ca_dir / "ca.pem"), _cert(kits.coordinator / "server.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1", "::1"}
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert datetime.timedelta(days=30) <= lifetime <= datetime.timedelta(days=31)
    assert ca.not_valid_after_utc > server.not_valid_after_utc
    key = serialization.load_pem_private_key((kits.coordinator / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()  # type: ignore[union-attr]


def test_secrets_are_0600_and_folders_0700(kits: KitLayout) -> None:
    secrets = [kits.ca_dir / "ca.key", kits.coordinator / "server.key", *(kits.site(s) / "site.key" for s in SITES)]
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in [kits.root, kits.ca_dir, kits.coordinator, kits.authorised_keys, *(kits.site(s) for s in SITES)]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    # each secret exists exactly once, in the folder of the only party that needs it
    assert list(kits.root.rglob("ca.key")) == [kits.ca_dir / "ca.key"]
    assert list(kits.root.rglob("server.key")) == [kits.coordinator / "server.key"]
    assert sorted(kits.root.rglob("site.key")) == sorted(kits.site(s) / "site.key" for s in SITES)


def test_site_keys_are_openssh_p256_pairs_and_the_coordinator_holds_each_public_half(kits: KitLayout) -> None:
    registered = authorised_site_keys(kits.coordinator)
    assert sorted(registered) == sorted(SITES)
    publics = set()
    for site in SITES:
        private = serialization.load_ssh_private_key((kits.site(site) / "site.key").read_bytes(), None)
        public = load_site_public_key(kits.site(site) / "site.pub")
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1)
        assert public.public_numbers() == private.public_key().public_numbers()
        assert (kits.site(site) / "site.pub").read_bytes().startswith(b"ecdsa-sha2-nistp256 ")
        assert registered[site].read_bytes() == (kits.site(site) / "site.pub").read_bytes()
        publics.add(public.public_numbers())
    assert len(publics) == len(SITES)


def test_site_toml_template_loads_and_starts_a_tls_authenticated_supernode(kits: KitLayout) -> None:
    kit = kits.site("charite")
    cfg = SiteConfig.load(kit / "site.toml")
    assert cfg.site_id == "charite" and cfg.address == "coord.example.org:9443" and not cfg.insecure
    assert cfg.root_certificates == (kit / "ca.pem").resolve()
    assert cfg.auth_private_key == (kit / "site.key").resolve()
    assert check_auth_keys(cfg) == []
    cmd = supernode_command(cfg)
    assert cmd[cmd.index("--root-certificates") + 1] == str((kit / "ca.pem").resolve())
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str((kit / "site.key").resolve())
    assert "--insecure" not in cmd
    readme = (kit / "README.md").read_text()
    assert "site.key" in readme and "coord.example.org:9443" in readme


def test_existing_kits_are_never_overwritten_without_force(kits: KitLayout, tmp_path: Path) -> None:
    before = (kits.site("ucl") / "site.key").read_bytes()
    with pytest.raises(ProvisionError, match="refusing to overwrite"):
        provision(kits.root, SITES, HOSTS)
    assert (kits.site("ucl") / "site.key").read_bytes() == before

    out = provision(tmp_path / "k", ["a"], ["127.0.0.1"]).root
    old_ca = (out / "coordinator" / "ca.pem").read_bytes()
    provision(out, ["a"], ["127.0.0.1"], force=True)
    assert (out / "coordinator" / "ca.pem").read_bytes() != old_ca


def test_add_puts_new_sites_under_the_existing_ca(tmp_path: Path) -> None:
    out = provision(tmp_path / "k", ["a"], ["10.0.0.1"]).root
    ca = (out / "coordinator" / "ca.pem").read_bytes()
    provision(out, ["b"], ["10.0.0.1"], add=True)
    assert (out / "b" / "ca.pem").read_bytes() == ca and sorted(authorised_site_keys(out / "coordinator")) == ["a", "b"]
    assert "`a/`" in (out / "README.md").read_text() and "`b/`" in (out / "README.md").read_text()
    with pytest.raises(ProvisionError, match="already exist for a"):
        provision(out, ["a"], ["10.0.0.1"], add=True)
    with pytest.raises(ProvisionError, match="needs an existing kit"):
        provision(tmp_path / "none", ["c"], ["10.0.0.1"], add=True)


@pytest.mark.parametrize(
    ("sites", "hosts", "needle"),
    [
        (["a", "a"], ["h"], "more than once"),
        (["../etc"], ["h"], "not usable as a folder name"),
        (["coordinator"], ["h"], "reserved"),
        (["a"], ["coord.example.org:9092"], "without port"),
        (["a"], ["bad_host!"], "neither an IP address nor a valid DNS name"),
        (["a"], [], "at least one --superlink-host"),
    ],
)
def test_bad_names_are_refused_before_anything_is_written(tmp_path: Path, sites: list[str], hosts: list[str],
                                                          needle: str) -> None:
    with pytest.raises(ProvisionError, match=needle):
        provision(tmp_path / "kits", sites, hosts)
    assert not (tmp_path / "kits").exists()


def test_ipv6_hosts_become_ip_sans_and_bracketed_addresses(tmp_path: Path) -> None:
    assert isinstance(san_entry("[2001:db8::1]"), x509.IPAddress)
    out = provision(tmp_path / "k", ["a"], ["2001:db8::1"], port=9092).root
    assert SiteConfig.load(out / "a" / "site.toml").address == "[2001:db8::1]:9092"


def test_cli_provision_then_refuses_a_second_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["provision", "--sites", "a,b", "--superlink-host", "coord.example.org", "--superlink-host", "10.0.0.5",
            "--out", str(tmp_path / "kits"), "--days", "90"]
    assert main(argv) == 0
    assert "coordinator start --kit" in capsys.readouterr().out
    assert sorted(authorised_site_keys(tmp_path / "kits" / "coordinator")) == ["a", "b"]
    assert main(argv) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
