"""Documentation as tests: find the shell blocks of README.md and docs/*.md and check their markers.

Convention (README "Contributing and testing"): an HTML comment line directly above a fenced ```bash
block says what CI does with it.

- ``<!-- runnable -->``: the block is run, as written, by ``tests/integration/test_docs_commands.py``.
- ``<!-- runnable: REASON (covered by tests/PATH.py::test_NAME) -->``: the block cannot run on a CI
  runner (``needs-network-host``: real hosts, root, systemd, Docker, Kubernetes, a coordinator with
  sites attached; ``long``: many minutes to hours of training, beyond the docs suite's few-minute
  budget) and names the test that exercises the same commands. The test must
  exist, so the reference cannot rot.

Every ```bash / ```sh / ```shell / ```console block carries one of the two, so a new page cannot skip
the rule. Other blocks (toml, json, csv, python, plain text) are data or output and are never run.

How the runnable blocks are run (one folder and one private namespace per page, daemons in the
background): tests/docs_runner.py. ``tests/docs_fixtures/<file stem>.sh``, when present, runs first in
that folder and makes what the page assumes the reader already has (a kit, a data export).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "docs_fixtures"
SHELL_LANGUAGES = frozenset({"bash", "sh", "shell", "console"})
REASONS = ("needs-network-host", "long")
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*runnable(?::\s*(?P<rest>.*?))?\s*-->\s*$")
_COVERED = re.compile(r"^(?P<reason>[a-z-]+)\s*\(covered by (?P<test>[^()\s]+::[A-Za-z_][A-Za-z0-9_]*)\)$")


class MarkerError(ValueError):
    """A block's marker is missing or malformed; the message names file and line."""


@dataclass(frozen=True)
class Marker:
    """What CI does with a block: run it (``reason`` empty) or trust ``covered_by`` for it."""

    reason: str = ""
    covered_by: str = ""

    @property
    def runs(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class Block:
    """One fenced code block; ``line`` is the 1-based line of its opening fence."""

    path: Path
    line: int
    language: str
    code: str
    marker_line: str | None  # the raw line above the fence when it is a ``<!-- runnable ... -->`` comment

    @property
    def where(self) -> str:
        try:
            shown = self.path.relative_to(REPO)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with its language and the marker line above it.

    An unterminated fence is an error (CommonMark would swallow the rest of the page into it, and with
    it every later block's marker)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening["fence"]
        language = opening["info"].strip().split(" ")[0].lower()
        above = lines[i - 1] if i > 0 and _MARKER.match(lines[i - 1]) else None
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence) \
                    and not closing["info"].strip():
                break
            body.append(lines[j])
            j += 1
        else:
            raise MarkerError(f"{path}:{i + 1}: code block opened with {fence} is never closed")
        blocks.append(Block(path, i + 1, language, "\n".join(body) + "\n", above))
        i = j + 1
    return blocks


def marker_of(block: Block) -> Marker:
    """The block's parsed marker; raises MarkerError naming the line and the two accepted forms."""
    forms = ("'<!-- runnable -->' (CI runs it) or '<!-- runnable: needs-network-host (covered by "
             "tests/integration/test_X.py::test_Y) -->'")
    if block.marker_line is None:
        raise MarkerError(f"{block.where}: ```{block.language} block has no marker on the line above it; "
                          f"add {forms}")
    rest = (_MARKER.match(block.marker_line)["rest"] or "").strip()  # type: ignore[index]
    if not rest:
        return Marker()
    covered = _COVERED.match(rest)
    if not covered or covered["reason"] not in REASONS:
        raise MarkerError(f"{block.where}: marker '{block.marker_line.strip()}' not understood; expected {forms}, "
                          f"with a reason out of {', '.join(REASONS)}")
    return Marker(covered["reason"], covered["test"])


def covering_test_problem(test_id: str, root: Path = REPO) -> str | None:
    """None when ``tests/...py::test_name`` names a test function that exists, else what is wrong."""
    file_part, _, name = test_id.partition("::")
    test_file = root / file_part
    if not test_file.is_file():
        return f"{test_id}: no file {file_part}"
    if not re.search(rf"^\s*def {re.escape(name)}\(", test_file.read_text(encoding="utf-8"), re.M):
        return f"{test_id}: {file_part} has no function {name}"
    return None


def documentation_files(root: Path = REPO) -> list[Path]:
    """README.md and docs/*.md: the pages a user is pointed to."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def fixture_script(page: Path) -> Path | None:
    """``tests/docs_fixtures/<stem>.sh`` for a page (``README.md`` -> ``README.sh``), if there is one."""
    candidate = FIXTURES / f"{page.stem}.sh"
    return candidate if candidate.is_file() else None
