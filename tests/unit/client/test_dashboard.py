"""The site dashboard over a site that took part in a real run: health, manifest counts, ledger, audit log."""

from __future__ import annotations

import html
import json
import socket
import warnings
from pathlib import Path

import pandas as pd
import pytest

from fedfusion.client import dashboard
from fedfusion.client.audit import iter_records
from fedfusion.client.dashboard import create_app, run_dashboard
from fedfusion.client.ledger import PrivacyLedger
from fedfusion.common.dashboard import DashboardError
from tests.dashboard_runs import BUDGETS, EVIL, RUN_ID, DashboardRun, shared_dashboard_run

with warnings.catch_warnings():  # Starlette 1.3 asks for httpx2, which Flower does not install
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TOKEN = "site-token-0123456789"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> DashboardRun:
    return shared_dashboard_run(tmp_path_factory)


def _client(config: Path, **kwargs: object) -> TestClient:
    return TestClient(create_app(config, **kwargs), base_url="http://127.0.0.1")  # type: ignore[arg-type]


def test_page_shows_health_manifest_ledger_and_audit(made: DashboardRun, tmp_path: Path) -> None:
    page = _client(made.site_toml("A", tmp_path)).get("/")

    assert page.status_code == 200
    text = page.text
    assert '<td id="site-id">A</td>' in text
    assert "nothing listens on 127.0.0.1:1" in text  # [supernode] port 1: the SuperNode is down
    assert "<th>rows</th><td class=\"n\">20</td>" in text and "train 12" in text
    assert 'id="ledger-table"' in text and "<td>toy-dp</td>" in text
    assert 'id="audit-table"' in text and text.count('<svg class="chart"') == 2
    assert f'<td>{RUN_ID}</td>' in text


def test_no_patient_value_reaches_the_page(made: DashboardRun, tmp_path: Path) -> None:
    client = _client(made.site_toml("A", tmp_path))
    frame = pd.read_csv(made.site_dirs["A"] / "manifest.csv")

    text = client.get("/").text + json.dumps(client.get("/api/manifest").json())

    assert "median" not in text
    for case_id in frame["case_id"]:
        assert case_id not in text
    for value in frame["age"].dropna().tolist() + frame["time"].round(4).tolist():
        assert f">{value}<" not in text and f" {value} " not in text


def test_manifest_problems_are_counted_not_listed(made: DashboardRun, tmp_path: Path) -> None:
    frame = pd.read_csv(made.site_dirs["A"] / "manifest.csv", dtype=str, keep_default_na=False)
    frame.loc[3, "age"] = "417-secret"
    bad = tmp_path / "bad" / "manifest.csv"
    bad.parent.mkdir()
    frame.to_csv(bad, index=False)
    config = made.site_toml("A", tmp_path)
    config.write_text(config.read_text().replace(str(made.site_dirs["A"] / "manifest.csv"), str(bad)))

    summary = _client(config).get("/api/manifest").json()

    assert summary["ok"] is False and "1 problem(s)" in summary["message"] and "417-secret" not in summary["message"]


def test_ledger_numbers_are_the_ledgers_own(made: DashboardRun, tmp_path: Path) -> None:
    ledger = _client(made.site_toml("A", tmp_path)).get("/api/ledger").json()

    spent = PrivacyLedger(made.site_dirs["A"] / "privacy-ledger.json").epsilon("toy-dp", 1e-5)
    (study,) = ledger["studies"]
    assert study["study"] == "toy-dp" and study["epsilon"] == pytest.approx(spent)
    assert study["max_epsilon"] == BUDGETS["A"] and study["remaining"] == pytest.approx(BUDGETS["A"] - spent)
    assert [c["round"] for c in ledger["charges"]] == [1] and ledger["charges"][0]["run"] == RUN_ID


def test_ledger_read_defensively_when_its_api_changes(made: DashboardRun, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import fedfusion.client.ledger as ledger_module

    def changed(*args: object, **kwargs: object) -> None:
        raise TypeError("status_rows() got an unexpected keyword argument")

    monkeypatch.setattr(ledger_module, "status_rows", changed)
    ledger = _client(made.site_toml("A", tmp_path)).get("/api/ledger").json()

    recorded = json.loads((made.site_dirs["A"] / "privacy-ledger.json").read_text())
    assert ledger["method"] == "epsilon_after recorded in the ledger"
    assert ledger["studies"][0]["epsilon"] == recorded["studies"]["toy-dp"]["entries"][-1]["epsilon_after"]


def test_damaged_ledger_and_audit_log_are_reported(made: DashboardRun, tmp_path: Path) -> None:
    config = made.site_toml("A", tmp_path)
    (tmp_path / "ledger.json").write_text("{not json")
    (tmp_path / "audit.jsonl").write_text('{"run_id": 1, "round": 1, "message_type": "train", "sha256": "x"}\n{"tor')
    text = config.read_text().replace(str(made.site_dirs["A"] / "privacy-ledger.json"), str(tmp_path / "ledger.json"))
    config.write_text(text.replace(str(made.site_dirs["A"] / "audit.jsonl"), str(tmp_path / "audit.jsonl")))

    page = _client(config).get("/")

    assert page.status_code == 200
    assert "the ledger cannot be read" in page.text and "last line is incomplete" in page.text


def test_audit_log_filtered_by_run_and_round(made: DashboardRun, tmp_path: Path) -> None:
    client = _client(made.site_toml(EVIL, tmp_path))
    records = list(iter_records(made.site_dirs[EVIL] / "audit.jsonl"))

    everything = client.get("/api/audit").json()
    round_two = client.get("/api/audit", params={"run": RUN_ID, "round": 2}).json()
    other_run = client.get("/api/audit", params={"run": "999"}).json()
    page = client.get("/", params={"run": RUN_ID, "round": 2}).text

    assert everything["total"] == len(records) == 5  # evaluate replies in rounds 0-2, train replies in 1-2
    assert round_two["total"] == sum(1 for r in records if r["round"] == 2) == 2
    assert {r["round"] for r in round_two["records"]} == {2}
    assert round_two["runs"][str(RUN_ID)]["payload_bytes"] == sum(r["payload_bytes"] for r in records
                                                                  if r["round"] == 2)
    assert other_run["total"] == 0
    assert "<h3>Replies (2)</h3>" in page and 'value="2"' in page and f'value="{RUN_ID}"' in page


def test_malicious_site_id_renders_as_text(made: DashboardRun, tmp_path: Path) -> None:
    text = _client(made.site_toml(EVIL, tmp_path, site_id=EVIL)).get("/").text

    assert EVIL not in text
    assert f'<td id="site-id">{html.escape(EVIL)}</td>' in text


def test_health_sees_a_listening_supernode(made: DashboardRun, tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        health = _client(made.site_toml("A", tmp_path, port=port)).get("/api/health").json()

    assert health["supernode"]["state"] == "up" and health["site"] == "A"
    assert health["superexec"]["state"] in ("down", "unknown") and health["transport"] == "INSECURE (no TLS)"


def test_token_and_bind_rules(made: DashboardRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = made.site_toml("A", tmp_path)
    with pytest.raises(DashboardError, match="--token"):
        create_app(config, host="0.0.0.0")
    assert run_dashboard(config, host="10.1.2.3", port=0) == 2 and "refusing" in capsys.readouterr().err
    assert run_dashboard(tmp_path / "missing.toml") == 2 and "site config not found" in capsys.readouterr().err

    client = TestClient(create_app(config, host="0.0.0.0", token=TOKEN), base_url="http://site.example")

    assert client.get("/").status_code == 401 and client.get("/api/ledger").status_code == 401
    assert client.get("/", params={"token": "x" * 20}).status_code == 403
    page = client.get("/", params={"token": TOKEN})
    assert page.status_code == 200 and f'name="token" value="{TOKEN}"' in page.text  # the filter form keeps it
    assert client.post("/", params={"token": TOKEN}).status_code == 405


def test_refreshes_only_while_the_site_is_active(made: DashboardRun, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(made.site_toml("A", tmp_path), refresh=3)

    active = client.get("/").text
    monkeypatch.setattr(dashboard, "LIVE_WINDOW_S", -1.0)
    idle = client.get("/").text

    assert '<meta http-equiv="refresh" content="3">' in active and "http-equiv" not in idle


def test_health_shows_what_the_site_supervisor_last_wrote(tmp_path: Path) -> None:
    from fedfusion.client.daemon import SiteConfig, status_path_for
    from fedfusion.client.dashboard import site_health
    from fedfusion.client.supervisor import write_status

    config = tmp_path / "site.toml"
    config.write_text('[site]\nid = "A"\nmanifest = "m.csv"\nschema = "s.json"\n[coordinator]\naddress = "c:1"\n'
                      "insecure = true\n")
    cfg = SiteConfig.load(config)
    assert site_health(cfg)["daemon"]["state"] == "unknown"
    write_status(status_path_for(cfg), {"state": "restarting", "restarts": 3, "last_exit_code": 1})
    daemon = site_health(cfg)["daemon"]
    assert daemon["state"] == "restarting" and daemon["restarts"] == 3 and daemon["last_exit_code"] == 1
