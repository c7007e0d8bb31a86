"""`fedfusion simulate` as a user runs it with output to a log (not a terminal): plain progress lines in
order through rounds and baselines, no Flower/Ray notices, and a report a reader can take in."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_simulate_logs_plain_progress_hides_runtime_notices_and_writes_a_short_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fedfusion.cli", "simulate", "--dataset", "ovarian", "--partition",
                           "natural", "--rounds", "2", "--local-epochs", "1", "--baseline-epochs", "2", "--out",
                           str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("simulate: ")]
    expected = ["simulate: building sites", "simulate: federation round 0/2", "simulate: federation round 1/2",
                "simulate: federation round 2/2", "simulate: baseline pooled epoch 0/2",
                "simulate: baseline pooled epoch 2/2", "simulate: baseline local-only site study-13 epoch 1/2",
                "simulate: baseline local-only site study-9 epoch 2/2", "simulate: writing report"]
    positions = [next((i for i, line in enumerate(lines) if line.startswith(text)), -1) for text in expected]
    assert -1 not in positions and positions == sorted(positions), lines
    assert sum(line.startswith("simulate: federation round 0/2") for line in lines) == 2  # starting, then scored
    assert re.search(r"simulate: federation round 2/2 train loss \d\.\d{3} c_index 0\.\d{3} val c_index 0\.\d{3} "
                     r"sites 4", done.stderr)
    assert "━" not in done.stderr  # no bar redraws in a log
    assert "DEPRECATED FEATURE" not in done.stderr and "run_simulation" not in done.stderr
    assert "FutureWarning" not in done.stderr and "Tip: In future versions of Ray" not in done.stderr
    # Flower's Ray backend logs "Manually terminating ClientAppActor" in every idle actor at the end; Ray
    # forwards it unless ray.shutdown wins the race (tests/unit/simulations/test_runtime_notices.py is exact)
    assert "ClientAppActor" not in done.stdout + done.stderr

    report = (out / "report.md").read_text()
    top = report.split("## Rounds")[0]
    assert "| site | test n | events |" in top
    rounds = next(b for b in report.split("## Rounds")[1].split("\n\n") if b.startswith("| round"))
    header = [h.strip() for h in rounds.splitlines()[0].strip("|").split("|")]
    assert len(header) <= 8 and header[:2] == ["round", "train loss"]
    assert not re.search(r"\| \d+\.0000 \|", rounds.splitlines()[2])  # counts are integers
    assert (out / "federated" / "site_c_index.png").stat().st_size > 0
    federated = (out / "federated" / "report.md").read_text()
    assert "95 % CI" in federated.split("## Rounds")[0]
