"""site.toml ``[auth]``: the site's SuperNode key reaches Flower only over TLS, and a key Flower
could not use (unreadable, wrong type, halves from different kits) stops the site before it connects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedfusion.client.daemon import SiteConfig, check_auth_keys, start_site, supernode_command
from fedfusion.common.config import ConfigError
from fedfusion.server.provision import make_site_key

BASE = '[site]\nid = "A"\nmanifest = "m.csv"\nschema = "s.json"\n[coordinator]\naddress = "coord:9092"\n'


def _config(tmp_path: Path, transport: str, auth: str = "") -> Path:
    path = tmp_path / "site.toml"
    path.write_text(BASE + transport + auth)
    return path


def _key_pair(folder: Path, name: str = "site") -> tuple[Path, Path]:
    private, public = make_site_key()
    (folder / f"{name}.key").write_bytes(private)
    os.chmod(folder / f"{name}.key", 0o600)
    (folder / f"{name}.pub").write_bytes(public)
    return folder / f"{name}.key", folder / f"{name}.pub"


def test_auth_key_is_resolved_and_passed_to_the_supernode(tmp_path: Path) -> None:
    _key_pair(tmp_path)
    cfg = SiteConfig.load(_config(tmp_path, 'root-certificates = "ca.pem"\n',
                                  '[auth]\nprivate-key = "site.key"\npublic-key = "site.pub"\n'))
    assert cfg.auth_private_key == tmp_path / "site.key" and cfg.auth_public_key == tmp_path / "site.pub"
    assert check_auth_keys(cfg) == []
    cmd = supernode_command(cfg)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "site.key")
    assert "--auth-supernode-public-key" not in cmd  # deprecated in Flower 1.41: derived from the private key


def test_without_auth_table_no_key_is_passed(tmp_path: Path) -> None:
    cfg = SiteConfig.load(_config(tmp_path, 'root-certificates = "ca.pem"\n'))
    assert cfg.auth_private_key is None and check_auth_keys(cfg) == []
    assert "--auth-supernode-private-key" not in supernode_command(cfg)


@pytest.mark.parametrize(
    ("transport", "auth", "needle"),
    [
        ("insecure = true\n", '[auth]\nprivate-key = "site.key"\n', "[auth] needs TLS"),
        ('root-certificates = "ca.pem"\n', '[auth]\npublic-key = "site.pub"\n', "needs private-key"),
        ('root-certificates = "ca.pem"\n', '[auth]\nprivate-key = 3\n', "needs private-key"),
        ('root-certificates = "ca.pem"\n', '[auth]\nprivate-key = "k"\npublic-key = 1\n', "must be a file path"),
    ],
)
def test_bad_auth_table_is_named(tmp_path: Path, transport: str, auth: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SiteConfig.load(_config(tmp_path, transport, auth))
    assert needle in str(caught.value) and "site.toml" in str(caught.value)


def _checked(tmp_path: Path, auth: str) -> str:
    cfg = SiteConfig.load(_config(tmp_path, 'root-certificates = "ca.pem"\n', auth))
    with pytest.raises(ConfigError) as caught:
        check_auth_keys(cfg)
    return str(caught.value)


def test_missing_unreadable_or_foreign_keys_stop_the_site(tmp_path: Path) -> None:
    assert "cannot read it" in _checked(tmp_path, '[auth]\nprivate-key = "absent.key"\n')
    (tmp_path / "pem.key").write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    assert "needs an ECDSA key" in _checked(tmp_path, '[auth]\nprivate-key = "pem.key"\n')
    (tmp_path / "junk.key").write_text("not a key")
    assert "not an unencrypted OpenSSH private key" in _checked(tmp_path, '[auth]\nprivate-key = "junk.key"\n')
    _key_pair(tmp_path, "one")
    _key_pair(tmp_path, "two")
    assert "do not belong together" in _checked(tmp_path, '[auth]\nprivate-key = "one.key"\npublic-key = "two.pub"\n')


def test_a_world_readable_key_is_warned_about(tmp_path: Path) -> None:
    key, _ = _key_pair(tmp_path)
    os.chmod(key, 0o644)
    cfg = SiteConfig.load(_config(tmp_path, 'root-certificates = "ca.pem"\n', '[auth]\nprivate-key = "site.key"\n'))
    assert any("chmod 600" in w for w in check_auth_keys(cfg))


def test_site_start_refuses_a_bad_key_before_reading_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, 'root-certificates = "ca.pem"\n', '[auth]\nprivate-key = "absent.key"\n')
    monkeypatch.setattr("fedfusion.client.daemon.check_site", lambda *a, **k: pytest.fail("read the data"))
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: pytest.fail("started a process"))
    assert start_site(config) == 2
    assert "absent.key" in capsys.readouterr().err
