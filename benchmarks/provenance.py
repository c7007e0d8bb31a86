"""Where a benchmark number came from: the command, the commit, the machine and how busy it was.

Every benchmark that writes raw JSON (``--json``/``--out``) puts :func:`provenance` under the key
``"provenance"``, so a table in docs/benchmarks.md can be traced to the exact run that produced it and
read against the load it ran under (timings on a 2-core machine shared with a CI run are not the
timings of an idle one). Call :func:`provenance` once at the start of a run (``started``) and pass it
to :func:`write_json` at the end, which adds the load average then.

    started = provenance()
    ...
    write_json(path, {"rows": rows}, started)
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Distributions whose versions change benchmark numbers.
VERSIONED = ("flwr", "torch", "opacus", "timm", "numpy", "cryptography", "grpcio")
#: Changed files listed by name in ``uncommitted_files`` at most (the rest are counted).
MAX_LISTED = 50


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def _gpus() -> list[str]:
    """CUDA devices torch sees (empty without torch or without a GPU): the card a GPU number was run on."""
    if "torch" not in sys.modules:
        return []
    torch = sys.modules["torch"]
    try:
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not lose the benchmark's numbers
        return []


def _versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _changed_files() -> list[str]:
    """Tracked files that differ from ``commit``: with them the commit alone does not say what ran
    (``uncommitted_changes`` says whether; this says which, e.g. only docs or the measured code)."""
    lines = _git("diff", "--name-only", "HEAD").splitlines()
    more = [f"... {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
    return lines[:MAX_LISTED] + more


def provenance() -> dict[str, Any]:
    """Command, commit (and whether the tree had uncommitted changes), machine and load at the start."""
    changed = _changed_files()
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(changed),
        "uncommitted_files": changed,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_gib": _memory_gib(),
            "gpus": _gpus(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": _versions(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_json(path: str | Path, payload: dict[str, Any], started: dict[str, Any]) -> Path:
    """``payload`` plus ``"provenance"`` (``started`` with the load average and time at the end).

    ``payload`` is a dict (a list of rows goes under a key such as ``"rows"``), so the provenance has a
    place beside the numbers; a payload with its own ``"provenance"`` key is refused rather than
    silently overwritten."""
    if not isinstance(payload, dict) or "provenance" in payload:
        raise ValueError(f"write_json needs a dict payload without a 'provenance' key, got {type(payload).__name__}"
                         + (" with 'provenance'" if isinstance(payload, dict) else ""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**payload, "provenance": {**started, "gpus_end": _gpus() or started["machine"]["gpus"],
                                        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                        "load_average_end": [round(x, 2) for x in os.getloadavg()]}}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
