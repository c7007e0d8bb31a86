"""Processes fedfusion starts find Flower's helpers and never phone home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedfusion.common.flower_tools import executable, tool_env


def test_flower_processes_start_with_telemetry_and_update_checks_off() -> None:
    env = tool_env()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_the_cli_turns_telemetry_off_before_flower_is_imported() -> None:
    probe = ("import os, sys; from fedfusion.cli import main; "
             "sys.argv = ['fedfusion', 'datasets', 'list']; main(['datasets', 'list']); "
             "import flwr.supercore.telemetry as t; print(t.FLWR_TELEMETRY_ENABLED)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0"


def test_flower_executables_resolve_beside_this_interpreter() -> None:
    assert Path(executable("flower-superlink")).parent == Path(sys.executable).parent
