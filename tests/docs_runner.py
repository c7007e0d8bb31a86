"""Running the runnable blocks of one documentation page, as a reader would type them.

One page = one fresh folder and one shell session's worth of state: the page's fixture script, then
each block in order, each under ``bash -euo pipefail`` with its own timeout, all inside one private
user + mount + PID namespace (when ``unshare`` allows it) where:

- ``/etc``, ``/var``, ``/srv`` and ``/opt`` are copy-on-write overlays, so ``/etc/fedfusion/site.toml``
  can be written exactly as a guide says while the machine's own folders never change;
- every process a block leaves behind (a coordinator, a site, a dashboard) dies with the namespace
  when the page is done, whatever it did to detach itself.

Commands that run until stopped (``fedfusion coordinator start``, ``fedfusion site start``, the
dashboards) are recognised by DAEMONS and started in the background, exactly as written, with their
output in ``.docs/daemon-N.log``; the block goes on once the command prints its readiness line, and
fails if it exits or is not ready in time. Nothing else about a command is changed: small parameters
reach the product only through environment variables.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.docs_blocks import REPO, Block

# System folders the guides name (/etc/fedfusion, /var/lib/fedfusion, /srv/research, /opt/fedfusion).
PRIVATE_ROOTS = ("/etc", "/var", "/srv", "/opt")
_ABSOLUTE_SYSTEM_PATH = re.compile(r"(?<![\w.~-])/(?:etc|var|srv|opt)/")

# (command at the start of a line, what it prints once it serves, seconds to wait for that)
DAEMONS: tuple[tuple[re.Pattern[str], str, int], ...] = (
    (re.compile(r"^\s*fedfusion coordinator start\b"), r"registered|no site keys were given", 120),
    (re.compile(r"^\s*fedfusion site start\b"), r'"event": ?"started"', 120),
    (re.compile(r"^\s*fedfusion (coordinator|site) dashboard\b"), r"://[^ ]+:[0-9]+/", 60),
)

_READY_FUNCTION = r'''_docs_ready() {  # log, regex, seconds, pid: wait until a background command serves
  local i=0
  while [ "$i" -lt "$(( $3 * 10 ))" ]; do
    if grep -Eq -- "$2" "$1" 2>/dev/null; then return 0; fi
    if ! kill -0 "$4" 2>/dev/null; then
      echo "[docs harness] background command exited before it was ready; its output:"; cat "$1"; return 1
    fi
    sleep 0.1; i=$((i + 1))
  done
  echo "[docs harness] background command not ready after $3 s; its output:"; cat "$1"; return 1
}
'''


@dataclass(frozen=True)
class BlockRun:
    block: Block
    returncode: int
    output: str
    seconds: float

    @property
    def failure(self) -> str | None:
        """Why the block counts as failed, or None."""
        if self.returncode == 124:
            return "timed out"
        if self.returncode != 0:
            return f"exit code {self.returncode}"
        if "Traceback" in self.output:
            return "a Python traceback in the output"
        return None

    def report(self) -> str:
        return (f"{self.block.where}: documented command block failed ({self.failure}, {self.seconds:.0f} s)\n"
                f"--- block ---\n{self.block.code}--- output (last 4000 characters) ---\n{self.output[-4000:]}")


def docs_environment(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment blocks run in: this interpreter's bin/ first on PATH (the project's venv, where
    ``fedfusion`` and ``flwr`` live), HOME inside the work folder so the runner's ``~/.flwr`` and caches
    are never touched, FEDFUSION_REPO for fixture scripts, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    home = workdir / ".home"
    home.mkdir(parents=True, exist_ok=True)
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "HOME": str(home),
        "FEDFUSION_REPO": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    })
    env.update(extra or {})
    return env


def uses_system_paths(code: str) -> bool:
    """True when shell code names a path under one of PRIVATE_ROOTS."""
    return bool(_ABSOLUTE_SYSTEM_PATH.search(code))


def _namespace_prefix(layer: Path) -> list[str]:
    """``unshare`` command prefix: new user (mapped to root), mount and PID namespaces, the overlays."""
    mounts = []
    for root in PRIVATE_ROOTS:
        if Path(root).is_dir():
            upper, work = layer / root.strip("/") / "upper", layer / root.strip("/") / "work"
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount -t overlay overlay -o lowerdir={root},upperdir={upper},workdir={work} {root}")
    setup = "".join(f"{m} && " for m in mounts)
    return ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--mount-proc",
            "bash", "-c", setup + 'exec "$@"', "bash"]


def namespaces_unavailable() -> str | None:
    """Why pages cannot run in a private namespace here (a skip reason for pages that need one), or None."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([*_namespace_prefix(Path(tmp)), "touch", "/etc/.fedfusion-docs-probe"],
                              capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return f"no private user + mount + PID namespace with an overlay of /etc: {done.stderr.strip()[-300:]}"
    return None


def backgrounded(code: str) -> str:
    """``code`` with each DAEMONS command line (continuation lines included) started in the background
    and waited for; the text of the command itself is untouched."""
    lines = code.splitlines()
    out: list[str] = []
    count = 0
    i = 0
    while i < len(lines):
        logical = [lines[i]]
        while logical[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            logical.append(lines[i])
        i += 1
        match = next(((ready, wait) for pattern, ready, wait in DAEMONS if pattern.match(logical[0])), None)
        if match is None:
            out.extend(logical)
            continue
        count += 1
        log = f".docs/daemon-{count}.log"
        out.extend(["{", *logical, f"}} > {log} 2>&1 < /dev/null &", f"_docs_ready {log} '{match[0]}' {match[1]} $!"])
    return (_READY_FUNCTION if count else "") + "\n".join(out) + "\n"


def _driver(count: int, timeouts: list[float]) -> str:
    """The page's session: run ``.docs/block-K.sh`` in order, recording exit code, output and seconds."""
    steps = []
    for k in range(count):
        steps.append(
            f"start=$(date +%s.%N); timeout -k 5 {timeouts[k]:.0f} bash -euo pipefail .docs/block-{k}.sh "
            f"> .docs/out-{k} 2>&1 < /dev/null; echo $? > .docs/rc-{k}; "
            f"echo \"$start $(date +%s.%N)\" > .docs/time-{k}")
    return "\n".join(steps) + "\n"


def run_page(scripts: list[str], workdir: Path, env: dict[str, str], timeout_s: float,
             private: bool) -> list[tuple[int, str, float]]:
    """Run shell scripts in order as one session in ``workdir``: (exit code, output, seconds) each.

    ``private``: inside the private namespace (see the module docstring); otherwise directly, and what a
    block left running is killed by process group at the end. A script past ``timeout_s`` is killed and
    gets exit code 124; later scripts still run."""
    state = workdir / ".docs"
    state.mkdir(parents=True, exist_ok=True)
    for k, code in enumerate(scripts):
        (state / f"block-{k}.sh").write_text(backgrounded(code), encoding="utf-8")
    (state / "driver.sh").write_text(_driver(len(scripts), [timeout_s] * len(scripts)), encoding="utf-8")
    command = ["bash", str(state / "driver.sh")]
    if private:
        command = [*_namespace_prefix(state / "fs"), *command]
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=len(scripts) * (timeout_s + 10) + 30)
    except subprocess.TimeoutExpired:
        pass
    finally:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
    results = []
    for k in range(len(scripts)):
        rc_file, out_file, time_file = state / f"rc-{k}", state / f"out-{k}", state / f"time-{k}"
        output = out_file.read_text(encoding="utf-8", errors="replace") if out_file.is_file() else ""
        if not rc_file.is_file():
            results.append((124, output + "\n[docs harness] the page ran out of time before this block ended", 0.0))
            continue
        returncode = int(rc_file.read_text().strip())
        if returncode == 124:
            output += f"\n[docs harness] killed after {timeout_s:.0f} s"
        start, end = (float(x) for x in time_file.read_text().split())
        results.append((returncode, output, end - start))
    return results


def run_script(code: str, workdir: Path, env: dict[str, str], timeout_s: float,
               private: bool = False) -> tuple[int, str, float]:
    """One script as a page of its own: (exit code, output, seconds)."""
    return run_page([code], workdir, env, timeout_s, private)[0]


def run_blocks(blocks: list[Block], fixture: str | None, workdir: Path, env: dict[str, str], timeout_s: float,
               private: bool) -> tuple[tuple[int, str, float] | None, list[BlockRun]]:
    """A page's fixture (if any) and then its blocks, in one session: (fixture result, block runs)."""
    scripts = ([fixture] if fixture is not None else []) + [b.code for b in blocks]
    results = run_page(scripts, workdir, env, timeout_s, private)
    fixture_result = results.pop(0) if fixture is not None else None
    return fixture_result, [BlockRun(b, *r) for b, r in zip(blocks, results, strict=True)]
