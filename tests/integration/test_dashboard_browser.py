"""Both dashboards in a real browser while ``fedfusion simulate`` runs in the background.

Debian's ``chromium`` (``apt-get install chromium``) driven by Playwright's Python package with that
system executable: no browser is downloaded (``playwright install`` is never run). The coordinator page
must show the round counter advancing through the live run, the per-site table and a chart; the site
page its health, ledger, audit table and charts; and a site named ``<script>alert(1)</script>`` must
render as text on both, with no dialog opening. Screenshots are saved and checked; with
``FEDFUSION_UPDATE_SCREENSHOTS=1`` they are also copied to ``docs/img/`` for the README.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.dashboard_runs import EVIL, make_dashboard_run

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

CHROMIUM = Path(os.environ.get("FEDFUSION_CHROMIUM", "/usr/bin/chromium"))
ROUNDS = 4
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


def _require_browser() -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the playwright Python package is not installed (pip install playwright; the browser is the "
                    "system chromium, 'playwright install' is not needed)")
    if importlib.util.find_spec("SurvSet") is None:
        pytest.skip("the ovarian data set needs the datasets extra (pip install -e '.[datasets]')")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """A ``fedfusion`` command in its own process group (so Ray workers it starts stop with it)."""
    command = [str(Path(sys.executable).parent / "fedfusion"), *args]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"})


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dashboard exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"dashboard at {url} did not answer within {timeout:.0f} s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{path}: {len(data)} bytes"


def test_both_dashboards_in_chromium_while_a_simulation_runs(tmp_path: Path) -> None:
    _require_browser()
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    runs, kit = tmp_path / "runs", tmp_path / "kit"
    runs.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start(["simulate", "--dataset", "ovarian", "--rounds", str(ROUNDS), "--no-baselines",
                             "--local-epochs", "3", "--out", str(runs / "live")], tmp_path / "simulate.log"))
        coordinator, site = _free_port(), _free_port()
        site_toml = tmp_path / "site" / "site.toml"
        site_toml.parent.mkdir()
        site_toml.write_text('[site]\nid = "pending"\nmanifest = "m.csv"\nschema = "s.json"\n'
                             '[coordinator]\naddress = "127.0.0.1:9092"\ninsecure = true\n')
        procs.append(_start(["coordinator", "dashboard", "--runs-dir", str(runs), "--state-dir", str(tmp_path),
                             "--port", str(coordinator), "--refresh", "1"], tmp_path / "coordinator.log"))
        procs.append(_start(["site", "dashboard", str(site_toml), "--port", str(site), "--refresh", "1"],
                            tmp_path / "site.log"))
        # A finished DP run whose second site is named like an XSS payload, and that site's own files.
        made = make_dashboard_run(kit, run_dir=runs / "xss-study")
        made.site_toml("A", site_toml.parent, site_id="st-marys")
        coordinator_url, site_url = f"http://127.0.0.1:{coordinator}", f"http://127.0.0.1:{site}"
        _wait_until_up(coordinator_url, procs[1], tmp_path / "coordinator.log")
        _wait_until_up(site_url, procs[2], tmp_path / "site.log")

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            dialogs: list[str] = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

            # The live run: the page reloads itself (meta refresh) and the counter climbs to the last round.
            page.goto(f"{coordinator_url}/?run=live/federated")
            seen: list[int] = []
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                if procs[0].poll() not in (None, 0):
                    pytest.fail(f"simulate failed:\n{(tmp_path / 'simulate.log').read_text()[-3000:]}")
                if page.locator("#round-counter").count() == 0:  # no run folder yet (404), or mid-reload
                    page.wait_for_timeout(500)
                    page.goto(f"{coordinator_url}/?run=live/federated")
                    continue
                try:
                    value = int(page.get_attribute("#round-counter", "data-round", timeout=2000) or -1)
                    status = page.inner_text("#run-status", timeout=2000)
                except PlaywrightError:  # the page reloaded between the two reads
                    continue
                if not seen or value != seen[-1]:
                    seen.append(value)
                if status == "finished":
                    break
                page.wait_for_timeout(250)
            print(f"round counter seen in the browser: {seen}")
            assert seen[-1] == ROUNDS and len(seen) >= 2 and seen == sorted(seen), seen
            assert page.inner_text("#round-counter") == f"round {ROUNDS} / {ROUNDS}"
            assert page.locator("#sites-table tr").count() == 1 + 4  # header + the 4 real ovarian studies
            assert "study-16" in page.inner_text("#sites-table")
            assert page.locator("svg.chart").count() >= 4
            page.screenshot(path=str(tmp_path / "coordinator-full.png"), full_page=True)
            page.screenshot(path=str(tmp_path / "coordinator.png"))

            page.goto(f"{coordinator_url}/?run=xss-study")
            assert EVIL in page.inner_text("#sites-table") and page.locator("script").count() == 0

            page.goto(site_url)
            assert page.inner_text("#site-id") == "st-marys"
            assert "toy-dp" in page.inner_text("#ledger-table") and page.locator("#audit-table tr").count() > 1
            assert page.locator("svg.chart").count() == 2
            page.screenshot(path=str(tmp_path / "site.png"))
            made.site_toml("A", site_toml.parent, site_id=EVIL)
            page.goto(site_url)
            assert page.inner_text("#site-id") == EVIL and page.locator("script").count() == 0
            page.wait_for_timeout(500)
            browser.close()
        assert dialogs == []
        for name in ("coordinator-full.png", "coordinator.png", "site.png"):
            _check_png(tmp_path / name)
        if os.environ.get("FEDFUSION_UPDATE_SCREENSHOTS") == "1":
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tmp_path / "coordinator.png", DOCS_IMG / "coordinator-dashboard.png")
            shutil.copy2(tmp_path / "site.png", DOCS_IMG / "site-dashboard.png")
    finally:
        for proc in procs:
            _stop(proc)
