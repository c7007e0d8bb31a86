"""``fedfusion site check`` as a hospital engineer reads it: exit code, problems in file order, warnings."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from fedfusion.client.site_check import EXIT_INVALID, EXIT_OK, check_site
from fedfusion.common.config import Schema


def _check(manifest: Path, schema: Schema, tmp_path: Path) -> tuple[int, str]:
    console = Console(record=True, width=400)
    code = check_site(manifest, schema.save(tmp_path / "schema.json"), console=console)
    return code, console.export_text()


def test_an_empty_column_fails_the_check_and_a_mostly_empty_one_is_a_printed_warning(
        site: Path, schema: Schema, tmp_path: Path) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame.loc[0:24, "age"] = ""
    frame.to_csv(site, index=False)
    code, out = _check(site, schema, tmp_path)
    assert code == EXIT_OK and "warning:" in out and "'age' 62%" in out

    frame["grade"] = ""
    frame.to_csv(site, index=False)
    code, out = _check(site, schema, tmp_path)
    assert code == EXIT_INVALID
    assert "1 problem(s)" in out and "column 'grade': no value in any of the 40 rows" in out


def test_problems_print_in_line_order(site: Path, schema: Schema, tmp_path: Path) -> None:
    frame = pd.read_csv(site, dtype=str, keep_default_na=False)
    frame.loc[9, "age"] = "old"
    frame.loc[1, "gene0"] = "high"
    frame.loc[5, "label"] = "maybe"
    frame.to_csv(site, index=False)
    code, out = _check(site, schema, tmp_path)
    assert code == EXIT_INVALID
    positions = [out.index(f"line {n},") for n in (3, 7, 11)]
    assert positions == sorted(positions), out


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
def test_a_legacy_encoded_export_names_the_line_and_the_fix(site: Path, schema: Schema, tmp_path: Path,
                                                            encoding: str) -> None:
    lines = site.read_text().splitlines()
    lines[5] = lines[5].replace("P004", "P004é", 1)
    site.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    code, out = _check(site, schema, tmp_path)
    assert code == EXIT_INVALID
    assert "line 6, column 'case_id'" in out and "b'\\xe9'" in out
    assert "save the file as UTF-8 (Excel: Save As > CSV UTF-8)" in out
