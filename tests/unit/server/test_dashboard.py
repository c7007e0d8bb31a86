"""The coordinator dashboard over a real run folder: pages, JSON numbers, live state, safety rules."""

from __future__ import annotations

import html
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from fedfusion.common.dashboard import DashboardError
from fedfusion.server.dashboard import SuperLinkRuns, create_app, run_dashboard
from fedfusion.server.run_folders import discover_runs
from tests.dashboard_runs import EVIL, ROUNDS, DashboardRun, shared_dashboard_run

with warnings.catch_warnings():  # Starlette 1.3 asks for httpx2, which Flower does not install
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RUN = "study/federated"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> DashboardRun:
    return shared_dashboard_run(tmp_path_factory)


def _client(runs_dir: Path, tmp_path: Path, **kwargs: object) -> TestClient:
    app = create_app(runs_dir, state_dir=tmp_path / "no-coordinator", **kwargs)  # type: ignore[arg-type]
    return TestClient(app, base_url="http://127.0.0.1")


def test_page_shows_round_counter_sites_epsilon_and_charts(made: DashboardRun, tmp_path: Path) -> None:
    page = _client(made.root / "runs", tmp_path).get("/", params={"run": RUN})

    assert page.status_code == 200
    text = page.text
    assert f'data-round="{ROUNDS}"' in text and f"round {ROUNDS} / {ROUNDS}" in text
    assert 'id="sites-table"' in text and '<td class="site-id">A</td>' in text
    assert text.count('<svg class="chart"') >= 4
    assert "ε spent per site (dashed: its budget)" in text
    assert "Refused rounds" in text and "past this site&#39;s budget of 6" in text
    assert 'http-equiv="refresh"' not in text  # finished: nothing to refresh for


def test_malicious_site_id_is_escaped_everywhere(made: DashboardRun, tmp_path: Path) -> None:
    client = _client(made.root / "runs", tmp_path)

    pages = [client.get("/", params={"run": RUN}).text, client.get("/report", params={"run": RUN}).text]

    for text in pages:
        assert EVIL not in text
        assert html.escape(EVIL) in text or html.escape(EVIL, quote=False) in text
    assert "script-src" not in pages[0] and "default-src 'none'" in client.get("/").headers["content-security-policy"]


def test_json_numbers_equal_the_csv_files(made: DashboardRun, tmp_path: Path) -> None:
    client = _client(made.root / "runs", tmp_path)

    run = client.get("/api/run", params={"run": RUN}).json()
    listed = client.get("/api/runs").json()

    metrics = pd.read_csv(made.run_dir / "metrics.csv")
    for row, (_, expected) in zip(run["rounds"], metrics.iterrows(), strict=True):
        for column, value in expected.items():
            assert row.get(column) == (None if pd.isna(value) else pytest.approx(value)), column
    sites = pd.read_csv(made.run_dir / "site_metrics.csv")
    assert len(run["site_metrics"]) == len(sites)
    assert [r["epsilon"] for r in run["site_metrics"] if "epsilon" in r] == pytest.approx(
        sites["epsilon"].dropna().tolist())
    table = {s["site"]: s for s in run["sites"]}
    trained = sites[sites["phase"] == "train"]
    assert table["A"]["refusals"] == 1 and table["A"]["rounds_contributed"] == 1 and table["A"]["dropouts"] == 0
    assert table[EVIL]["rounds_contributed"] == ROUNDS and table[EVIL]["epsilon_budget"] == 20.0
    assert table[EVIL]["epsilon"] == pytest.approx(trained[trained["site"] == EVIL]["epsilon"].iloc[-1])
    assert listed == [{**listed[0], "run": RUN, "status": "finished", "rounds_done": ROUNDS, "rounds_total": ROUNDS,
                       "sites": 2}]


def _copy_live(made: DashboardRun, runs: Path, checkpoints: int) -> Path:
    """The run as it looked mid-run: run_config.json and the first ``checkpoints`` checkpoints only."""
    live = runs / "live"
    (live / "checkpoints").mkdir(parents=True)
    shutil.copy2(made.run_dir / "run_config.json", live / "run_config.json")
    for n in range(1, checkpoints + 1):
        shutil.copy2(made.run_dir / "checkpoints" / f"round-{n:04d}.pt", live / "checkpoints" / f"round-{n:04d}.pt")
    now = time.time()
    for path in [live / "run_config.json", *(live / "checkpoints").iterdir()]:
        os.utime(path, (now, now))
    return live


def test_live_run_reads_its_newest_checkpoint_and_refreshes(made: DashboardRun, tmp_path: Path) -> None:
    live = _copy_live(made, tmp_path / "runs", checkpoints=1)
    client = _client(tmp_path / "runs", tmp_path, refresh=2)

    run = client.get("/api/run", params={"run": "live"}).json()
    page = client.get("/").text

    assert run["status"] == "running" and run["rounds_done"] == 1 and run["source"] == "checkpoints/round-0001.pt"
    assert [r["round"] for r in run["rounds"]] == [0, 1]
    assert {s["site"] for s in run["sites"]} == {"A", EVIL}
    assert 'data-round="1"' in page and f"round 1 / {ROUNDS}" in page
    assert '<meta http-equiv="refresh" content="2">' in page
    shutil.rmtree(live / "checkpoints")
    assert client.get("/api/run", params={"run": "live"}).json()["status"] == "starting"
    old = time.time() - 3 * 3600
    os.utime(live / "run_config.json", (old, old))
    assert client.get("/api/run", params={"run": "live"}).json()["status"] == "stalled"


def test_new_numeric_columns_show_up_unasked(made: DashboardRun, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "secure"
    shutil.copytree(made.run_dir, run)
    frame = pd.read_csv(run / "metrics.csv")
    frame["secagg_masked"] = [None] + [2] * ROUNDS
    frame["secagg_recovered_dropouts"] = [None] + [0] * ROUNDS
    frame["brand_new_figure"] = range(len(frame))
    frame.to_csv(run / "metrics.csv", index=False)

    page = _client(tmp_path / "runs", tmp_path).get("/", params={"run": "secure"}).text

    assert 'id="secagg-table"' in page and "<th>recovered_dropouts</th>" in page
    assert "aria-label=\"brand_new_figure\"" in page and "<th>brand_new_figure</th>" in page


def test_downloads_and_report(made: DashboardRun, tmp_path: Path) -> None:
    client = _client(made.root / "runs", tmp_path)

    model = client.get("/download/model.pt", params={"run": RUN})
    report = client.get("/download/report.md", params={"run": RUN})

    assert model.status_code == 200 and model.content == (made.run_dir / "model.pt").read_bytes()
    assert "attachment" in model.headers["content-disposition"]
    assert report.headers["content-type"].startswith("text/plain") and report.text.startswith("# Federated run")
    assert "<table>" in client.get("/report", params={"run": RUN}).text
    checkpoint = client.get("/download/checkpoint", params={"run": RUN})
    assert checkpoint.content == (made.run_dir / "checkpoints" / f"round-{ROUNDS:04d}.pt").read_bytes()
    assert client.get("/download/run_config.json", params={"run": RUN}).status_code == 404
    assert client.get("/download/model.pt", params={"run": "../../etc"}).status_code == 404
    assert client.get("/", params={"run": "study"}).status_code == 404


def test_downloads_never_follow_symlinks_out_of_the_run_folder(made: DashboardRun, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "linked"
    shutil.copytree(made.run_dir, run)
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:secret\n")
    for name in ("report.md", "metrics.csv"):
        (run / name).unlink()
        (run / name).symlink_to(secret)
    checkpoints = run / "checkpoints"
    newest = sorted(checkpoints.glob("round-*.pt"))[-1]
    newest.unlink()
    newest.symlink_to(secret)
    client = _client(tmp_path / "runs", tmp_path)

    for name in ("report.md", "metrics.csv", "checkpoint"):
        answer = client.get(f"/download/{name}", params={"run": "linked"})
        assert answer.status_code == 404 and "secret" not in answer.text, name
    assert client.get("/report", params={"run": "linked"}).status_code == 404
    assert client.get("/download/model.pt", params={"run": "linked"}).status_code == 200  # a real file still is


def test_discovery_stops_at_runs_and_skips_data(made: DashboardRun) -> None:
    found = discover_runs(made.root)

    assert found == {"runs/study/federated": made.run_dir}
    assert discover_runs(made.run_dir) == {".": made.run_dir}


def test_token_required_to_bind_beyond_loopback(made: DashboardRun, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DashboardError, match="--token"):
        create_app(made.root, host="0.0.0.0")
    with pytest.raises(DashboardError, match="at least 16"):
        create_app(made.root, host="0.0.0.0", token="short")

    code = run_dashboard(made.root, host="192.0.2.10", port=0)

    assert code == 2 and "refusing to serve the dashboard on 192.0.2.10" in capsys.readouterr().err
    create_app(made.root, host="0.0.0.0", token=TOKEN)  # with a token it may
    create_app(made.root, host="::1")  # loopback needs none


def test_every_request_must_carry_the_token(made: DashboardRun, tmp_path: Path) -> None:
    client = TestClient(create_app(made.root / "runs", host="0.0.0.0", token=TOKEN, state_dir=tmp_path),
                        base_url="http://dashboard.example")

    assert client.get("/").status_code == 401
    assert client.get("/api/runs").status_code == 401
    assert client.get("/download/model.pt", params={"run": RUN}).status_code == 401
    assert client.get("/", params={"token": "wrong-token-wrong-token"}).status_code == 403
    assert client.get("/", headers={"authorization": "Bearer nope"}).status_code == 403
    page = client.get("/", params={"token": TOKEN, "run": RUN})
    assert page.status_code == 200 and f"token={TOKEN}" in page.text  # links keep it
    assert client.get("/api/runs", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/api/runs", headers={"x-fedfusion-token": TOKEN}).status_code == 200


def test_read_only_and_loopback_host_header_only(made: DashboardRun, tmp_path: Path) -> None:
    client = _client(made.root / "runs", tmp_path)

    assert client.post("/").status_code == 405
    assert client.delete("/download/model.pt", params={"run": RUN}).status_code == 405
    assert client.get("/", headers={"host": "attacker.example"}).status_code == 400  # DNS rebinding
    assert client.get("/", headers={"host": "localhost:8050"}).status_code == 200


def test_superlink_runs_and_nodes_from_flwr(made: DashboardRun, tmp_path: Path) -> None:
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text("[superlink]\n")
    replies = {"ls": {"success": True, "runs": [{"run-id": "42", "status": "running", "fab-name": "fedfusion"}]},
               "supernode": {"success": True, "nodes": [{"node-id": "7", "status": "online"}]}}
    calls: list[list[str]] = []

    class Done:
        def __init__(self, command: list[str]) -> None:
            calls.append(command)
            self.stdout, self.stderr = "log line\n" + json.dumps(replies[command[1]]), ""

    links = SuperLinkRuns(tmp_path, runner=lambda command, **kwargs: Done(command))
    snapshot = links.refresh()
    page = TestClient(create_app(made.root / "runs", superlink=links), base_url="http://127.0.0.1").get("/").text
    down = SuperLinkRuns(tmp_path, runner=lambda *a, **k: (_ for _ in ()).throw(OSError("connection refused")))

    assert snapshot["available"] and snapshot["runs"][0]["run-id"] == "42" and snapshot["nodes"][0]["node-id"] == "7"
    assert [c[1:] for c in calls[:2]] == [["ls", "fedfusion", "--format", "json"],
                                          ["supernode", "ls", "fedfusion", "--format", "json"]]
    assert 'id="superlink-table"' in page and 'id="supernodes-table"' in page
    assert not down.refresh()["available"] and "connection refused" in down.snapshot["message"]
    assert "no coordinator state" in SuperLinkRuns(tmp_path / "nowhere").current()["message"]
