"""Documentation as tests: every shell block of README.md and docs/*.md is either run here, as written,
or marked as needing real hosts (or long training) with the test that covers the same commands.

The marker checks are fast and run with every test run, so a page with an unmarked block fails at once.
Running the blocks is ``pytest -m docs``: per page, its fixture (tests/docs_fixtures/) and then its
runnable blocks in order, in one folder and one private namespace (tests/docs_runner.py). The
convention: tests/docs_blocks.py and README "Contributing and testing".
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.docs_blocks import (
    Block,
    MarkerError,
    covering_test_problem,
    documentation_files,
    fixture_script,
    marker_of,
    parse_blocks,
)
from tests.docs_runner import docs_environment, namespaces_unavailable, run_blocks, uses_system_paths

# Seconds one block may run before it is killed (the slowest today, benchmarks/secagg_overhead.py in
# docs/benchmarks.md, takes 23 s on an idle machine and 145 s at load average 11).
BLOCK_TIMEOUT_S = float(os.environ.get("FEDFUSION_DOCS_BLOCK_TIMEOUT", "300"))


def _shell_blocks() -> list[Block]:
    return [b for page in documentation_files() for b in parse_blocks(page) if b.is_shell]


def _runnable_by_page() -> dict[Path, list[Block]]:
    pages: dict[Path, list[Block]] = {}
    for block in _shell_blocks():
        try:
            runs = marker_of(block).runs
        except MarkerError:
            continue  # reported by test_every_shell_block_is_marked
        if runs:
            pages.setdefault(block.path, []).append(block)
    return pages


def test_every_shell_block_is_marked() -> None:
    problems = []
    for block in _shell_blocks():
        try:
            marker_of(block)
        except MarkerError as err:
            problems.append(str(err))
    assert not problems, "\n".join(problems)


def test_every_block_that_is_not_run_names_a_test_that_exists() -> None:
    problems = []
    for block in _shell_blocks():
        try:
            marker = marker_of(block)
        except MarkerError:
            continue
        if not marker.runs and (problem := covering_test_problem(marker.covered_by)):
            problems.append(f"{block.where}: {problem}")
    assert not problems, "\n".join(problems)


@pytest.mark.docs
@pytest.mark.integration
@pytest.mark.parametrize("page", sorted(_runnable_by_page()), ids=lambda p: p.name)
def test_documented_commands_run_as_written(page: Path, tmp_path: Path) -> None:
    blocks = _runnable_by_page()[page]
    fixture = fixture_script(page)
    setup = fixture.read_text(encoding="utf-8") if fixture else None
    unavailable = namespaces_unavailable()
    if unavailable and any(uses_system_paths(code) for code in [setup or "", *(b.code for b in blocks)]):
        pytest.skip(f"{page.name} names /etc, /var, /srv or /opt paths: {unavailable}")
    prepared, runs = run_blocks(blocks, setup, tmp_path, docs_environment(tmp_path), BLOCK_TIMEOUT_S,
                                private=unavailable is None)
    if prepared is not None:
        code, output, seconds = prepared
        print(f"{fixture.name}: fixture {'ok' if code == 0 else 'FAIL'} {seconds:.1f} s")
        if code != 0 or "Traceback" in output:
            pytest.fail(f"fixture {fixture} failed (exit {code}, {seconds:.0f} s):\n{output[-4000:]}", pytrace=False)
    for run in runs:
        print(f"{run.block.where}: {'FAIL' if run.failure else 'ok'} {run.seconds:.1f} s")
    failed = [run for run in runs if run.failure]
    if failed:
        pytest.fail("\n\n".join(run.report() for run in failed) + (
            "\n\n(blocks of one page share a folder: a later failure may follow from an earlier one)"
            if len(failed) > 1 else ""), pytrace=False)
