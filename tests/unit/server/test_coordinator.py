"""The coordinator's Flower commands: persistent state, no runtime dependency installation, TLS
and SuperNode authentication unless explicitly turned off, site keys registered through Flower's
CLI, and a private flwr connection file."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from fedfusion.server.coordinator import (
    CoordinatorError,
    CoordinatorPaths,
    _register_outcome,
    register_sites,
    resolve_certificates,
    superlink_command,
    toml_value,
    write_connection,
)


def test_superlink_never_installs_dependencies_and_persists_state(tmp_path: Path) -> None:
    paths = CoordinatorPaths(tmp_path)
    cmd = superlink_command(paths, "0.0.0.0", 9092, insecure=False, certificates=("ca.pem", "c.pem", "k.pem"))
    assert "--disable-runtime-dependency-installation" in cmd
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "superlink.db")
    assert cmd[cmd.index("--ssl-certfile") + 1] == "c.pem" and "--insecure" not in cmd
    with pytest.raises(ValueError, match="TLS needs"):
        superlink_command(paths, "0.0.0.0", 9092, insecure=False)


def test_connection_file_is_valid_flower_config(tmp_path: Path) -> None:
    path = write_connection(CoordinatorPaths(tmp_path), "127.0.0.1:9092", insecure=True)
    parsed = tomllib.loads(path.read_text())
    assert parsed["superlink"]["default"] == "fedfusion"
    assert parsed["superlink"]["fedfusion"] == {"address": "127.0.0.1:9092", "insecure": True}


def test_run_config_values_are_toml_literals() -> None:
    for value in (3, 0.001, True, "/data/a b/schema.json", 'quote"inside'):
        assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value


# --- TLS and SuperNode authentication -------------------------------------------------------------


@pytest.fixture
def kit(tmp_path: Path) -> Path:
    from fedfusion.server.provision import provision

    return provision(tmp_path / "kits", ["a", "b"], ["127.0.0.1"]).root / "coordinator"


def test_tls_turns_on_supernode_authentication_unless_told_otherwise(tmp_path: Path) -> None:
    paths, certs = CoordinatorPaths(tmp_path), ("ca.pem", "c.pem", "k.pem")
    assert "--enable-supernode-auth" in superlink_command(paths, "0.0.0.0", 9092, insecure=False, certificates=certs)
    assert "--enable-supernode-auth" not in superlink_command(paths, "0.0.0.0", 9092, insecure=False,
                                                              certificates=certs, node_auth=False)
    insecure = superlink_command(paths, "127.0.0.1", 9092, insecure=True)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure  # Flower refuses auth without TLS


def test_kit_supplies_the_tls_files_and_flags_override_them(kit: Path, tmp_path: Path) -> None:
    ca, cert, key = resolve_certificates(insecure=False, kit=kit)
    assert (ca, cert, key) == tuple(str((kit / n).resolve()) for n in ("ca.pem", "server.pem", "server.key"))
    other = tmp_path / "other.pem"
    other.write_text("x")
    assert resolve_certificates(insecure=False, kit=kit, cert=str(other))[1] == str(other)
    assert resolve_certificates(insecure=True) is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"insecure": True, "kit": "KIT"}, "do not combine"),
        ({"insecure": False}, "TLS needs --kit"),
        ({"insecure": False, "ca": "nope.pem", "cert": "nope.pem", "key": "nope.key"}, "TLS file not found"),
        ({"insecure": False, "kit": "EMPTY"}, "missing"),
    ],
)
def test_tls_settings_that_cannot_work_are_named(kit: Path, tmp_path: Path, kwargs: dict, needle: str) -> None:
    kwargs = {k: {"KIT": kit, "EMPTY": tmp_path}.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(CoordinatorError, match=needle):
        resolve_certificates(**kwargs)


def test_connection_carries_the_ca_for_run_and_status(tmp_path: Path, kit: Path) -> None:
    path = write_connection(CoordinatorPaths(tmp_path), "127.0.0.1:9092", insecure=False,
                            root_certificates=str(kit / "ca.pem"))
    conn = tomllib.loads(path.read_text())["superlink"]["fedfusion"]
    assert conn == {"address": "127.0.0.1:9092", "root-certificates": str((kit / "ca.pem").resolve())}


def test_register_output_of_flwr_is_understood() -> None:
    assert _register_outcome('{"success": true, "node-id": 42}') == (True, "registered as node 42")
    already = '{"success": false, "error-message": "Using SuperLink: x\\n\\n[code: 23] Public key already in use."}'
    assert _register_outcome(already) == (True, "already registered")
    ok, detail = _register_outcome('{"success": false, "error-message": "Using SuperLink\\n\\nConnection refused"}')
    assert not ok and detail == "Connection refused"


def test_register_sites_registers_each_key_once_and_names_a_failure(kit: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from fedfusion.server.provision import authorised_site_keys

    write_connection(CoordinatorPaths(tmp_path), "127.0.0.1:9092", insecure=False,
                     root_certificates=str(kit / "ca.pem"))
    calls: list[list[str]] = []
    replies = iter(['{"success": false, "error-message": "x\\n\\nConnection refused"}',  # Control API still starting
                    '{"success": true, "node-id": 7}',
                    '{"success": false, "error-message": "[code: 23] Public key already in use."}'])

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        assert kwargs["env"]["FLWR_HOME"] == str(tmp_path / "flwr")  # type: ignore[index]
        return subprocess.CompletedProcess(cmd, 0, next(replies), "")

    monkeypatch.setattr("subprocess.run", fake_run)
    monkeypatch.setattr("time.sleep", lambda _s: None)
    result = register_sites(tmp_path, authorised_site_keys(kit), timeout=30)
    assert result == {"a": "registered as node 7", "b": "already registered"}
    assert [c[c.index("--name") + 1] for c in calls] == ["a", "a", "b"]
    assert all(c[1:4] == ["supernode", "register", c[3]] and c[4] == "fedfusion" for c in calls)

    monkeypatch.setattr("subprocess.run", lambda cmd, **_: subprocess.CompletedProcess(
        cmd, 0, '{"success": false, "error-message": "[code: 24] invalid"}', ""))
    with pytest.raises(CoordinatorError, match="could not register site a"):
        register_sites(tmp_path, authorised_site_keys(kit), timeout=0)


def test_register_sites_needs_a_started_coordinator(kit: Path, tmp_path: Path) -> None:
    from fedfusion.server.provision import authorised_site_keys

    with pytest.raises(CoordinatorError, match="start the coordinator"):
        register_sites(tmp_path / "nowhere", authorised_site_keys(kit))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--insecure", "--kit", "KIT"], "do not combine"),
        ([], "TLS needs --kit"),
        (["--insecure", "--site-keys", "KIT"], "--site-keys needs node authentication"),
    ],
)
def test_coordinator_start_refuses_contradictions_before_starting_anything(
        kit: Path, tmp_path: Path, extra: list[str], needle: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedfusion.cli import main

    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: pytest.fail("started a process"))
    argv = ["coordinator", "start", "--state-dir", str(tmp_path / "state"), *[str(kit) if e == "KIT" else e
                                                                                for e in extra]]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_a_kit_roster_becomes_every_runs_reply_roster(tmp_path: Path) -> None:
    """`coordinator start --kit` keeps the kit's roster; `fedfusion run` then asks the ServerApp to verify
    every reply against it (server/reply_attribution.py) without a flag to remember."""
    from fedfusion.server.coordinator import adopt_kit_roster, state_roster

    state = tmp_path / "coordinator"
    assert state_roster(state) is None
    kit = tmp_path / "kit"
    kit.mkdir()
    assert adopt_kit_roster(kit, state) is None  # a kit without a roster changes nothing
    (kit / "roster.json").write_text('{"format": "fedfusion-roster/1", "sites": {}}\n')
    adopt_kit_roster(kit, state)
    assert state_roster(state) == (state / "roster.json").resolve()
    assert (state / "roster.json").read_text() == (kit / "roster.json").read_text()
