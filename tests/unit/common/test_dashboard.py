"""Safety rules and charts both dashboards share."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from fedfusion.common.dashboard import (
    DashboardError,
    check_bind,
    fmt_iso,
    fmt_number,
    is_loopback,
    json_safe,
    line_chart,
    link,
    resolve_token,
)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("dashboard.hospital.example", False),
])
def test_only_loopback_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_bind_rules() -> None:
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "a-long-enough-token")
    with pytest.raises(DashboardError, match="refusing to serve the dashboard on 0.0.0.0"):
        check_bind("0.0.0.0", None)
    with pytest.raises(DashboardError, match="at least 16 characters"):
        check_bind("127.0.0.1", "short")


def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFUSION_DASHBOARD_TOKEN", "from-the-environment")

    assert resolve_token(None) == "from-the-environment" and resolve_token("given") == "given"


def test_links_keep_the_token_and_drop_empty_parameters() -> None:
    assert link("/", None, run="a/b", round=None) == "/?run=a%2Fb"
    assert link("/report", "t0k", run="x") == "/report?run=x&token=t0k"


def test_chart_escapes_labels_and_is_valid_svg() -> None:
    evil = "<script>alert(1)</script>"

    svg = str(line_chart({evil: [(0, 0.5), (1, math.nan), (2, 0.7)], "B": [(0, 0.4)]}, title=evil,
                         limits={evil: 0.9}))

    assert evil not in svg and "&lt;script&gt;" in svg
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2


def test_chart_without_data_says_so() -> None:
    assert "no data yet" in line_chart({"a": []}, title="empty")


def test_number_and_time_formats() -> None:
    assert [fmt_number(v) for v in (3.0, 0.123456, math.nan, None, "x", True)] == ["3", "0.1235", "—", "", "x", "True"]
    assert fmt_iso("2026-11-23T10:15:02.123456+01:00") == "2026-11-23 09:15:02Z" and fmt_iso("junk") == "junk"
    assert json_safe({"a": [math.inf, 1.0], "b": {2}}) == {"a": [None, 1.0], "b": [2]}


def test_file_inside_refuses_every_symlink_on_the_way(tmp_path) -> None:
    from fedfusion.common.dashboard import file_inside

    run, outside = tmp_path / "run", tmp_path / "outside"
    (run / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("x")
    (run / "sub" / "real.csv").write_text("a")
    (run / "link.csv").symlink_to(outside / "secret")
    (run / "linkdir").symlink_to(outside)
    (run / "inner.csv").symlink_to(run / "sub" / "real.csv")  # even one that stays inside: not served
    assert file_inside(run, run / "sub" / "real.csv")
    assert not file_inside(run, run / "link.csv")
    assert not file_inside(run, run / "linkdir" / "secret")
    assert not file_inside(run, run / "inner.csv")
    assert not file_inside(run, run / ".." / "outside" / "secret")
    assert not file_inside(run, outside / "secret") and not file_inside(run, run / "sub")
