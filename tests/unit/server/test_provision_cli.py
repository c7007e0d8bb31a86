"""The provision and keygen commands as people type them: real site ids become exactly those kit
folders, sites can make their own keys so no kit holds a private key, and --add rewrites every roster."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedfusion.cli import main
from fedfusion.client.daemon import SiteConfig, check_auth_keys
from fedfusion.common.roster import Roster
from fedfusion.server.provision import authorised_site_keys

HOST = ["--superlink-host", "coord.example.org"]


def _kit_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in ("ca", "coordinator"))


def test_the_documented_command_with_real_ids_writes_exactly_those_kits(tmp_path: Path) -> None:
    """The real `fedfusion` executable, as the coordinator guide shows it (it failed with "site id '-'")."""
    command = Path(sys.executable).with_name("fedfusion")  # the console script pip installed beside python
    argv = [str(command)] if command.is_file() else [sys.executable, "-m", "fedfusion.cli"]
    proc = subprocess.run([*argv, "provision", "--sites", "st-marys,charite,ucl", *HOST, "--out", "kits"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote kits for st-marys, charite, ucl" in proc.stdout and proc.stderr == ""
    assert _kit_folders(tmp_path / "kits") == ["charite", "st-marys", "ucl"]
    assert sorted(authorised_site_keys(tmp_path / "kits" / "coordinator")) == ["charite", "st-marys", "ucl"]


def test_a_single_id_is_one_kit_not_one_per_letter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "--sites", "hospitalA", *HOST, "--out", str(tmp_path / "kits")]) == 0
    assert _kit_folders(tmp_path / "kits") == ["hospitalA"]
    assert SiteConfig.load(tmp_path / "kits" / "hospitalA" / "site.toml").site_id == "hospitalA"


def test_keygen_writes_a_private_p256_pair_and_refuses_to_replace_it(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["site", "keygen", "--out", str(tmp_path / "mine"), "--site-id", "ucl"]) == 0
    out = capsys.readouterr().out
    key_file, pub_file = tmp_path / "mine" / "site.key", tmp_path / "mine" / "site.pub"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    private = serialization.load_ssh_private_key(key_file.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1)
    public = serialization.load_ssh_public_key(pub_file.read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]
    line = pub_file.read_text()
    assert line.startswith("ecdsa-sha2-nistp256 ") and line.endswith(" fedfusion-site-ucl\n")
    ssh_keygen = subprocess.run(["ssh-keygen", "-lf", str(pub_file)], capture_output=True, text=True)
    if ssh_keygen.returncode == 0:  # the fingerprint printed is the one OpenSSH's own tool shows
        assert ssh_keygen.stdout.split()[1] in out
    before = key_file.read_bytes()
    assert main(["site", "keygen", "--out", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and len(err.strip().splitlines()) == 1
    assert key_file.read_bytes() == before


def test_kits_from_site_keys_hold_no_private_key_and_register_the_sites_own_keys(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pubs = tmp_path / "received"
    pubs.mkdir()
    for site in ("st-marys", "charite"):
        assert main(["site", "keygen", "--out", str(tmp_path / site)]) == 0
        (pubs / f"{site}.pub").write_bytes((tmp_path / site / "site.pub").read_bytes())
    out = tmp_path / "kits"
    assert main(["provision", "--site-keys", str(pubs), *HOST, "--out", str(out)]) == 0
    assert "no private key in the kits of st-marys, charite" in capsys.readouterr().out.replace("charite, st-marys",
                                                                                               "st-marys, charite")
    assert _kit_folders(out) == ["charite", "st-marys"]
    site_keys = [p for p in out.rglob("*") if p.is_file() and b"OPENSSH PRIVATE KEY" in p.read_bytes()]
    assert site_keys == [] and not list(out.rglob("site.key"))  # only ca.key and server.key: the coordinator's own
    roster = Roster.load(out / "coordinator" / "roster.json")
    for site in ("st-marys", "charite"):
        assert (out / "coordinator" / "sites" / f"{site}.pub").read_bytes() == (pubs / f"{site}.pub").read_bytes()
        own = serialization.load_ssh_private_key((tmp_path / site / "site.key").read_bytes(), None)
        assert roster.site_of(own.public_key()) == site  # type: ignore[arg-type]
        cfg = SiteConfig.load(out / site / "site.toml")
        assert cfg.auth_private_key == (out / site / "site.key").resolve()  # where the site puts its own key
        assert "not in this kit" in (out / site / "README.md").read_text()
        (out / site / "site.key").write_bytes((tmp_path / site / "site.key").read_bytes())  # what the site does
        (out / site / "site.key").chmod(0o600)
        assert check_auth_keys(cfg) == []  # its own key matches the public half the kit (and coordinator) hold


def test_site_keys_missing_or_not_p256_are_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pubs = tmp_path / "received"
    pubs.mkdir()
    assert main(["site", "keygen", "--out", str(tmp_path / "a")]) == 0
    (pubs / "a.pub").write_bytes((tmp_path / "a" / "site.pub").read_bytes())
    capsys.readouterr()
    assert main(["provision", "--site-keys", str(pubs), "--sites", "a,b", *HOST, "--out", str(tmp_path / "k")]) == 2
    assert "no public key for b; expected b.pub" in capsys.readouterr().err and not (tmp_path / "k").exists()
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    (pubs / "b.pub").write_bytes(p384.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    assert main(["provision", "--site-keys", str(pubs), *HOST, "--out", str(tmp_path / "k")]) == 2
    assert "needs an ECDSA P-256 key" in capsys.readouterr().err and not (tmp_path / "k").exists()


def test_add_rewrites_every_roster_and_says_the_sites_must_install_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kits"
    assert main(["provision", "--sites", "st-marys,charite,ucl", *HOST, "--out", str(out)]) == 0
    old = Roster.load(out / "ucl" / "roster.json").fingerprint
    capsys.readouterr()
    assert main(["provision", "--add", "--sites", "radboud", *HOST, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "existing sites (charite, st-marys, ucl) must install the new" in said and "re-approve" in said
    rosters = {kit: Roster.load(out / kit / "roster.json") for kit in ("coordinator", "st-marys", "charite", "ucl",
                                                                          "radboud")}
    assert {r.fingerprint for r in rosters.values()} == {rosters["coordinator"].fingerprint} != {old}
    assert sorted(rosters["ucl"].keys) == ["charite", "radboud", "st-marys", "ucl"]
    assert rosters["coordinator"].fingerprint in said
    assert json.loads((out / "radboud" / "roster.json").read_text())["format"] == "fedfusion-roster/1"


def test_a_bad_approve_app_hash_is_one_line_and_writes_nothing(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provision", "--sites", "a", *HOST, "--out", str(tmp_path / "k"), "--approve-app", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --approve-app: 'abc' is not a SHA-256") and not (tmp_path / "k").exists()
