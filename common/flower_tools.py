"""Finding and starting Flower's own executables (SuperLink, SuperNode, flwr) from this environment.

Both the coordinator and the site start Flower processes, and both hit the same trap: those
processes start helpers (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) by name, so
this interpreter's ``bin/`` must be first on PATH even when the user never activated the venv.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

# Flower sends anonymous usage telemetry and checks PyPI for updates unless told not to; a
# hospital's processes must not phone home (and offline hosts would only wait for timeouts).
NO_TELEMETRY = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment with this interpreter's bin/ first on PATH, telemetry off, plus ``extra``."""
    env = {**os.environ, **NO_TELEMETRY}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def executable(name: str) -> str:
    """Absolute path of a Flower executable installed beside this interpreter (else on PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"'{name}' not found; install fedfusion into this environment (pip install -e .)")
    return found
