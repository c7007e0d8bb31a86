"""The documentation harness's running side (tests/docs_runner.py): blocks fail on a non-zero exit, a
failing pipe stage, an unset variable, a traceback or a timeout; blocks of a page share a folder and a
private /etc; daemons run in the background until ready and die with the page."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.docs_blocks import Block
from tests.docs_runner import (
    BlockRun,
    backgrounded,
    docs_environment,
    namespaces_unavailable,
    run_blocks,
    run_page,
    run_script,
    uses_system_paths,
)


def _block(code: str, line: int = 7) -> Block:
    return Block(Path("/docs/guide.md"), line, "bash", code, "<!-- runnable -->")


@pytest.mark.parametrize(("code", "expected"), [
    ("true\n", 0),
    ("exit 3\n", 3),
    ("false\necho after\n", 1),              # -e: the first failing command ends the block
    ("false | cat\necho after\n", 1),        # pipefail: a failing stage fails the pipe
    ('echo "$NOT_SET_ANYWHERE"\necho after\n', 1),  # -u: a typo'd variable is an error, not ""
])
def test_blocks_run_under_bash_euo_pipefail(tmp_path: Path, code: str, expected: int) -> None:
    returncode, output, _ = run_script(code, tmp_path, docs_environment(tmp_path), timeout_s=30)

    assert returncode == expected, output
    assert "after" not in output


def test_blocks_see_the_project_environment_and_a_private_home(tmp_path: Path) -> None:
    returncode, output, _ = run_script('command -v fedfusion; echo "$HOME"; test -d "$FEDFUSION_REPO/docs"\n',
                                       tmp_path, docs_environment(tmp_path), timeout_s=30)

    assert returncode == 0, output
    fedfusion, home = output.split()
    assert Path(fedfusion).name == "fedfusion"
    assert Path(home) == tmp_path / ".home"


def test_a_block_past_its_timeout_is_killed_and_later_blocks_still_run(tmp_path: Path) -> None:
    results = run_page(["sleep 60\n", "echo next\n"], tmp_path, docs_environment(tmp_path), timeout_s=1,
                       private=False)

    (code, output, seconds), (next_code, next_output, _) = results
    assert code == 124
    assert seconds < 10
    assert "killed after 1 s" in output
    assert (next_code, next_output) == (0, "next\n")


def test_blocks_of_a_page_share_their_folder(tmp_path: Path) -> None:
    _, runs = run_blocks([_block("mkdir kits && echo key > kits/site.pub\n"), _block("cat kits/site.pub\n")],
                         "echo fixture > made-by-fixture\n", tmp_path, docs_environment(tmp_path), 30, private=False)

    assert [(r.returncode, r.output) for r in runs] == [(0, ""), (0, "key\n")]
    assert (tmp_path / "made-by-fixture").read_text() == "fixture\n"


def test_a_traceback_fails_a_block_that_exits_zero(tmp_path: Path) -> None:
    code = "python -c 'print(\"Traceback (most recent call last):\")'\n"
    _, (run,) = run_blocks([_block(code)], None, tmp_path, docs_environment(tmp_path), 30, private=False)

    assert run.returncode == 0
    assert run.failure == "a Python traceback in the output"
    assert "/docs/guide.md:7: documented command block failed" in run.report()
    assert BlockRun(run.block, 0, "fine\n", 0.1).failure is None


def test_system_paths_are_recognised() -> None:
    assert uses_system_paths("fedfusion site audit /etc/fedfusion/site.toml")
    assert uses_system_paths("--state-dir /var/lib/fedfusion/coordinator")
    assert not uses_system_paths("fedfusion provision --out kits/etc/x ~/etc/y")


def test_daemon_lines_are_backgrounded_untouched_and_others_are_not() -> None:
    code = ("fedfusion provision --sites a --out kits\n"
            "fedfusion coordinator start --kit kits/coordinator \\\n  --host 0.0.0.0   # SuperLink\n"
            "fedfusion status\n")

    script = backgrounded(code)

    assert "fedfusion coordinator start --kit kits/coordinator \\\n  --host 0.0.0.0   # SuperLink\n}" in script
    assert "} > .docs/daemon-1.log 2>&1 < /dev/null &\n_docs_ready .docs/daemon-1.log 'registered" in script
    assert "\nfedfusion provision --sites a --out kits\n{" in script
    assert script.endswith("\nfedfusion status\n")
    assert backgrounded("fedfusion status\n") == "fedfusion status\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_private_page_keeps_etc_writes_and_kills_what_it_left_running(tmp_path: Path) -> None:
    if reason := namespaces_unavailable():
        pytest.skip(reason)
    port = _free_port()
    marker = f"/etc/fedfusion-docs-test-{tmp_path.name}/written"
    serve = f"python -m http.server {port} --bind 127.0.0.1 > /dev/null 2>&1 &\nsleep 2\n"

    results = run_page([f"mkdir -p {Path(marker).parent} && echo kept > {marker}\n", f"cat {marker}\n", serve],
                       tmp_path, docs_environment(tmp_path), timeout_s=30, private=True)

    assert [(c, o) for c, o, _ in results] == [(0, ""), (0, "kept\n"), (0, "")]
    assert not Path(marker).exists()
    time.sleep(0.5)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "a server a block started outlived its page"


def test_a_documented_daemon_serves_for_later_commands_and_stops_with_the_page(tmp_path: Path) -> None:
    port = _free_port()
    block = _block(f"mkdir -p runs\nfedfusion coordinator dashboard --runs-dir runs --port {port}\n"
                   f"python -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:{port}/\").status)'\n")

    _, (run,) = run_blocks([block], None, tmp_path, docs_environment(tmp_path), 120,
                           private=namespaces_unavailable() is None)

    assert run.failure is None, run.report()
    assert run.output.strip().splitlines()[-1] == "200"
    assert f"127.0.0.1:{port}/" in (tmp_path / ".docs" / "daemon-1.log").read_text()
    time.sleep(0.5)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the dashboard outlived its page"


def test_a_daemon_that_exits_before_it_serves_fails_its_block_with_its_output(tmp_path: Path) -> None:
    block = _block("fedfusion site start no-such-site.toml\necho never\n")

    _, (run,) = run_blocks([block], None, tmp_path, docs_environment(tmp_path), 120, private=False)

    assert run.failure == "exit code 1"
    assert "background command exited before it was ready" in run.output
    assert "no-such-site.toml" in run.output
    assert "never" not in run.output
