"""The coordinator's Flower commands: persistent state, no runtime dependency installation, TLS
unless explicitly insecure, and a private flwr connection file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedfusion.server.coordinator import CoordinatorPaths, superlink_command, toml_value, write_connection


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
