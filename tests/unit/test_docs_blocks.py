"""The documentation harness's reading side (tests/docs_blocks.py): every shell block is found with its
line, language and marker; unmarked blocks, malformed markers and unclosed fences are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs_blocks import MarkerError, covering_test_problem, fixture_script, marker_of, parse_blocks

PAGE = """# Guide

<!-- runnable -->
```bash
fedfusion datasets list
```

<!-- runnable: needs-network-host (covered by tests/unit/test_docs_blocks.py::test_covering_test_must_exist) -->
```bash
fedfusion coordinator start --host 0.0.0.0
```

```toml
[site]
id = "st-marys"
```

- a list item:

  <!-- runnable -->
  ```sh
  echo indented
  ```

```bash
echo unmarked
```
"""


def _page(tmp_path: Path, text: str = PAGE) -> Path:
    path = tmp_path / "guide.md"
    path.write_text(text, encoding="utf-8")
    return path


def test_parse_finds_blocks_lines_languages_and_markers(tmp_path: Path) -> None:
    blocks = parse_blocks(_page(tmp_path))

    assert [(b.line, b.language, b.is_shell) for b in blocks] == [
        (4, "bash", True), (9, "bash", True), (13, "toml", False), (21, "sh", True), (25, "bash", True)]
    assert blocks[0].code == "fedfusion datasets list\n"
    assert blocks[3].code == "  echo indented\n"
    assert marker_of(blocks[0]).runs
    assert marker_of(blocks[3]).runs
    hosted = marker_of(blocks[1])
    assert (hosted.runs, hosted.reason) == (False, "needs-network-host")
    assert hosted.covered_by == "tests/unit/test_docs_blocks.py::test_covering_test_must_exist"


def test_an_unmarked_shell_block_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    unmarked = parse_blocks(_page(tmp_path))[-1]

    with pytest.raises(MarkerError, match=r"guide\.md:25: ```bash block has no marker.*<!-- runnable -->"):
        marker_of(unmarked)


@pytest.mark.parametrize("marker", [
    "<!-- runnable: needs-network-host -->",                                   # no covering test
    "<!-- runnable: later (covered by tests/x.py::test_y) -->",                # unknown reason
    "<!-- runnable: long (covered by tests/x.py) -->",                         # no test function
])
def test_a_malformed_marker_is_refused(tmp_path: Path, marker: str) -> None:
    block = parse_blocks(_page(tmp_path, f"{marker}\n```bash\ntrue\n```\n"))[0]

    with pytest.raises(MarkerError, match=r"guide\.md:2: marker .* not understood"):
        marker_of(block)


def test_a_marker_must_sit_directly_above_the_fence(tmp_path: Path) -> None:
    block = parse_blocks(_page(tmp_path, "<!-- runnable -->\n\n```bash\ntrue\n```\n"))[0]

    with pytest.raises(MarkerError, match="no marker"):
        marker_of(block)


def test_an_unclosed_fence_is_an_error_not_a_swallowed_page(tmp_path: Path) -> None:
    with pytest.raises(MarkerError, match=r"guide\.md:2: code block opened with ``` is never closed"):
        parse_blocks(_page(tmp_path, "<!-- runnable -->\n```bash\ntrue\n"))


def test_a_longer_fence_may_contain_a_shorter_one(tmp_path: Path) -> None:
    blocks = parse_blocks(_page(tmp_path, "````markdown\n```bash\nx\n```\n````\n"))

    assert [(b.language, b.code) for b in blocks] == [("markdown", "```bash\nx\n```\n")]


def test_covering_test_must_exist() -> None:
    assert covering_test_problem("tests/unit/test_docs_blocks.py::test_covering_test_must_exist") is None
    assert "no file" in covering_test_problem("tests/unit/test_nothing_here.py::test_x")
    assert "has no function test_gone" in covering_test_problem("tests/unit/test_docs_blocks.py::test_gone")


def test_each_page_finds_its_fixture_by_name() -> None:
    repo = Path(__file__).resolve().parents[2]

    assert fixture_script(repo / "docs" / "hospital-it.md") == repo / "tests" / "docs_fixtures" / "hospital-it.sh"
    assert fixture_script(repo / "docs" / "ray-cluster.md") is None
