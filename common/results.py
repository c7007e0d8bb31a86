"""Result files people open: CSV of metric rows and pretty JSON, written the same way everywhere."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """CSV of metric rows whose keys may differ (union of keys, in first-seen order)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")
    return path


def markdown_table(rows: Sequence[dict[str, Any]], digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table of metric rows; floats rounded to ``digits``."""
    if not rows:
        return "(none)"
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]

    def fmt(value: object) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys)
    body = "\n".join("| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows)
    return head + "\n" + body


def fsync_dir(folder: Path) -> None:
    """Make a file's creation or rename in ``folder`` durable too (POSIX); a no-op where folders cannot be
    opened. The privacy ledger and the audit log rely on it: a power cut must not undo what they recorded."""
    import os

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_line(path: Path, line: bytes, mode: int = 0o640) -> None:
    """Append one line durably: a single ``write`` on an O_APPEND descriptor (no interleaving between
    processes), then fsync (and the folder's, when the file was created). The site's audit log and
    the coordinator's ``replies.jsonl`` both rely on a line being whole or absent after a crash."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"{path}: short write ({written} of {len(line)} bytes); disk full?")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
