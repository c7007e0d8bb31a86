"""Progress display: plain lines in logs and pipes, a bar only on a terminal."""

from __future__ import annotations

import io

from fedfusion.common.progress import ProgressDisplay, Step, report, round_step


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_the_stream_is_not_a_terminal() -> None:
    stream = io.StringIO()
    with ProgressDisplay("simulate", stream) as progress:
        report(progress, "building sites")
        progress(round_step({"round": 1, "train_loss": 0.51234, "eval_c_index": 0.6012, "eval_val_c_index": 0.58,
                             "train_epsilon": 1.25, "sites_trained": 3, "sites_refused": 1}, rounds=2))
        report(progress, "baseline pooled", 3, 30, unit="epoch", detail="loss 0.412")
    assert stream.getvalue().splitlines() == [
        "simulate: building sites",
        "simulate: federation round 1/2 train loss 0.512 c_index 0.601 val c_index 0.580 ε 1.250 sites 3 (1 refused)",
        "simulate: baseline pooled epoch 3/30 loss 0.412",
    ]


def test_min_interval_thins_a_stage_but_keeps_its_first_and_last_line() -> None:
    stream = io.StringIO()
    with ProgressDisplay("explain", stream, min_interval=3600) as progress:
        for k in range(1, 6):
            progress(Step("permutation importance site A", k, 5, "feature"))
        progress(Step("permutation importance site B", 1, 5, "feature"))
    assert stream.getvalue().splitlines() == ["explain: permutation importance site A feature 1/5",
                                              "explain: permutation importance site A feature 5/5",
                                              "explain: permutation importance site B feature 1/5"]


def test_a_terminal_gets_a_bar_not_one_line_per_event() -> None:
    stream = _Terminal()
    with ProgressDisplay("simulate", stream) as progress:
        for epoch in range(1, 31):
            report(progress, "baseline pooled", epoch, 30, unit="epoch")
        progress.message("report: run/report.md")
    text = stream.getvalue()
    assert "report: run/report.md" in text
    assert "simulate: baseline pooled" not in text  # no plain-line prefix: rich drew a bar
    assert text.count("\n") < 30


def test_report_without_a_listener_does_nothing() -> None:
    report(None, "building sites")  # work code calls it unconditionally
    assert Step("x", 2, None, "round").text() == "x round 2"
