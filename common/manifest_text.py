"""The bytes of a site manifest as text, with the two export mistakes hospitals make most named plainly.

Spreadsheets save CSV in the machine's legacy code page (Windows-1252/Latin-1) unless told
otherwise, and in much of Europe they separate fields with ``;`` (or a tab) because ``,`` is the
decimal mark. pandas reports the first as a byte offset inside a read buffer and silently reads the
second as one column, so ``site check`` would list every column as missing. Here both become
problems that name the line (and column), show the bytes, and say which export setting fixes them.

This module knows nothing of the schema; ``common/manifest.py`` turns its problems into
``ManifestIssue`` lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

#: The export setting that fixes an encoding problem, in the words of the tools sites use.
SAVE_AS_UTF8 = "save the file as UTF-8 (Excel: Save As > CSV UTF-8)"
_SEPARATORS = {";": "';'", "\t": "tab", "|": "'|'"}
_MAX_LINES = 20

#: (message, line or None, column or None)
Problem = tuple[str, int | None, str | None]


class UnreadableText(ValueError):
    """The manifest is not comma-separated UTF-8 text; ``problems`` say where and how to re-export it."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(message for message, _, _ in problems))


def read_manifest_text(path: Path) -> str:
    """The manifest as text (a UTF-8 byte-order mark is dropped); raise :class:`UnreadableText` when
    it is not UTF-8 (every bad line, up to 20) or its header is not comma-separated."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UnreadableText(_encoding_problems(data)) from None
    _check_separator(text)
    return text


def _encoding_problems(data: bytes) -> list[Problem]:
    """One problem per line that is not UTF-8: its number, the column the bad bytes fall in, the bytes."""
    lines = data.split(b"\n")
    header = [name.strip() for name in lines[0].decode("utf-8", errors="replace").strip("\r").split(",")]
    problems: list[Problem] = []
    bad_lines = 0
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            bad_lines += 1
            if len(problems) == _MAX_LINES:
                continue
            bad = line[err.start:err.end]
            legacy = bad.decode("cp1252", errors="replace")
            before = line[:err.start]
            field = before.count(b",") if b'"' not in before else None  # quoted commas: do not guess
            column = header[field] if field is not None and number > 1 and field < len(header) else None
            problems.append((f"byte(s) {bad!r} (read as Windows-1252/Latin-1: {legacy!r}) are not UTF-8 text; "
                             f"{SAVE_AS_UTF8}", number, column))
    if bad_lines > len(problems):
        problems.append((f"... and {bad_lines - len(problems)} more line(s) that are not UTF-8; {SAVE_AS_UTF8}",
                         None, None))
    return problems


def _check_separator(text: str) -> None:
    """A header without a comma but with ``;``/tab/``|`` is an export with another separator."""
    header = next((line.strip("\r") for line in text.split("\n") if line.strip()), "")
    if "," in header:
        return
    found = [sep for sep in _SEPARATORS if sep in header]
    if not found:
        return
    sep = max(found, key=header.count)
    shown = header if len(header) <= 80 else header[:77] + "..."
    raise UnreadableText([(
        f"the header is one field {shown!r}: the file looks {_SEPARATORS[sep]}-separated; export with ',' as the "
        "separator (Excel: Save As > CSV UTF-8 (Comma delimited); LibreOffice: Field delimiter ',')", 1, None)])


class _Located(Protocol):
    @property
    def line(self) -> int | None: ...

    @property
    def column(self) -> str | None: ...


T = TypeVar("T", bound=_Located)


def in_file_order(issues: Sequence[T], columns: Sequence[str]) -> list[T]:
    """Issues as a person reads the file: whole-file problems first, then by line, then by the
    column's position in the header (the order checks ran in is not the order anyone scans a table)."""
    position = {name: index for index, name in enumerate(columns)}

    def key(issue: T) -> tuple[int, int, int]:
        return (0 if issue.line is None else 1, issue.line or 0, position.get(issue.column or "", -1))

    return sorted(issues, key=key)
