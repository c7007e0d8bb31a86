"""``fedfusion datasets export``: real sites as plain hospital-style CSV exports (no fedfusion columns)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedfusion.cli import main
from fedfusion.simulations.export import export_sites

pytest.importorskip("SurvSet", reason="ovarian needs the optional GPL 'survset' package")


def test_ovarian_exports_one_plain_csv_per_study(tmp_path: Path) -> None:
    written = export_sites("ovarian", tmp_path)
    assert sorted(written) == ["study-13", "study-16", "study-4", "study-9"]
    frames = {s: pd.read_csv(p) for s, p in written.items()}
    assert sum(len(f) for f in frames.values()) == 912
    columns = list(frames["study-4"].columns)
    assert columns[:4] == ["patient_id", "time_days", "event", "debulking"]
    assert sum(c.startswith("gene_") for c in columns) == 158
    assert not {"split", "site", "case_id", "time"} & set(columns)


def test_export_of_a_data_set_without_sites_fails_in_one_line(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets", "export", "wdbc-multimodal", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no natural sites" in err and err.count("\n") == 1
