"""The privacy ledger: a study never passes its budget, a crash never under-counts, restarts continue
the same ledger, and a damaged or half-written ledger never silently resets what was spent."""

from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedfusion.cli import main
from fedfusion.client.ledger import LedgerMissing, PrivacyLedger
from fedfusion.common.privacy import epsilon_of
from fedfusion.common.privacy_policy import BudgetExceeded, PrivacyError, PrivacyTerms

DELTA = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")


def _terms(cap: float, noise: float | None = None, floor: float = 0.0, cap_all: float = math.inf) -> PrivacyTerms:
    return PrivacyTerms(
        epsilon_cap=cap,
        delta=DELTA,
        max_grad_norm=1.0,
        min_noise_multiplier=floor,
        noise_multiplier=noise,
        accountant="rdp",
        epsilon_cap_all_studies=cap_all,
    )


# A round as a site sees it: how it samples, how many steps, whether the run fixed the noise, how
# many rounds are still planned, whether the site process restarted first, and where it crashed.
ROUND = st.fixed_dictionaries(
    {
        "rate": st.sampled_from([0.01, 0.05, 1.0]),
        "steps": st.integers(1, 60),
        "noise": st.one_of(st.none(), st.sampled_from([0.5, 0.9, 1.3, 2.5])),
        "planned": st.integers(1, 4),
        "restart": st.booleans(),
        "crash": st.sampled_from(["none", "none", "writing the ledger", "training", "before sending"]),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    schedule=st.lists(ROUND, min_size=1, max_size=7),
    cap=st.sampled_from([0.5, 2.0, 6.0]),
    floor=st.sampled_from([0.0, 0.8]),
    accountant=st.sampled_from(["rdp", "gdp"]),
)
def test_budget_never_passed_and_crashes_never_under_count(
    tmp_path_factory: pytest.TempPathFactory, schedule: list[dict], cap: float, floor: float, accountant: str
) -> None:
    path = tmp_path_factory.mktemp("site") / "privacy-ledger.json"
    ledger = PrivacyLedger(path, accountant)
    sent: list[tuple[float, float, int]] = []  # rounds whose update left the site
    for r in schedule:
        if r["restart"]:
            ledger = PrivacyLedger(path, accountant)  # a new ClientApp process: nothing but the file survives
        terms = _terms(cap, r["noise"], floor)
        try:
            if r["crash"] == "writing the ledger":
                with mock.patch("os.replace", side_effect=OSError("power cut")), pytest.raises(OSError):
                    ledger.charge(
                        "study",
                        sample_rate=r["rate"],
                        steps=r["steps"],
                        terms=terms,
                        planned_steps=r["steps"] * r["planned"],
                    )
                continue  # the round never trained: nothing was charged, nothing sent
            charge = ledger.charge(
                "study", sample_rate=r["rate"], steps=r["steps"], terms=terms, planned_steps=r["steps"] * r["planned"]
            )
        except BudgetExceeded:
            continue  # refused: nothing trained, nothing sent
        assert charge.noise_multiplier >= floor
        if r["crash"] in ("training", "before sending"):
            continue  # charged, then crashed: the update never left
        sent.append((charge.noise_multiplier, r["rate"], r["steps"]))

        recorded = PrivacyLedger(path, accountant).history("study")
        assert epsilon_of(recorded, DELTA, accountant) <= cap
        # everything that left is in the ledger (count before sending), so its ε covers what was sent
        assert all(recorded.count(entry) >= sent.count(entry) for entry in sent)
        assert epsilon_of(recorded, DELTA, accountant) >= epsilon_of(sent, DELTA, accountant)
    json.loads(path.read_text()) if path.exists() else None  # never a torn file


def test_study_at_budget_refuses_the_next_round_and_records_nothing(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    first = ledger.charge("s", sample_rate=1.0, steps=10, terms=_terms(2.0), planned_steps=20)
    second = ledger.charge("s", sample_rate=1.0, steps=10, terms=_terms(2.0, noise=first.noise_multiplier))
    assert first.epsilon_before == 0 and second.epsilon_after <= 2.0
    before = (tmp_path / "ledger.json").read_text()
    with pytest.raises(BudgetExceeded, match="study 's': this round .* past this site's budget of 2"):
        ledger.charge("s", sample_rate=1.0, steps=10, terms=_terms(2.0, noise=first.noise_multiplier))
    with pytest.raises(BudgetExceeded, match="the budget is spent"):
        ledger.charge("s", sample_rate=1.0, steps=10, terms=_terms(second.epsilon_after + 1e-4))
    assert (tmp_path / "ledger.json").read_text() == before
    assert ledger.charge("other-study", sample_rate=1.0, steps=10, terms=_terms(2.0)).epsilon_before == 0


def test_restarted_site_continues_the_same_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    charge = PrivacyLedger(path).charge("s", sample_rate=0.05, steps=20, terms=_terms(3.0), planned_steps=60)
    restarted = PrivacyLedger(path)
    assert restarted.history("s") == [(charge.noise_multiplier, 0.05, 20)]
    assert restarted.epsilon("s", DELTA) == charge.epsilon_after
    again = restarted.charge("s", sample_rate=0.05, steps=20, terms=_terms(3.0), planned_steps=40)
    assert again.epsilon_before == charge.epsilon_after and again.epsilon_after <= 3.0


def test_cap_over_all_studies_stops_renaming_a_study(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    first = ledger.charge("a", sample_rate=1.0, steps=5, terms=_terms(3.0, cap_all=4.0))
    with pytest.raises(BudgetExceeded, match="max-epsilon-all-studies = 4"):  # ε 2.96 alone, 4.39 with "a"
        ledger.charge("b", sample_rate=1.0, steps=5, terms=_terms(3.0, noise=first.noise_multiplier, cap_all=4.0))


def test_half_written_and_damaged_ledgers(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    ledger.charge("s", sample_rate=1.0, steps=5, terms=_terms(3.0))
    good = path.read_text()
    with mock.patch("os.replace", side_effect=OSError("disk full")), pytest.raises(OSError):
        ledger.charge("s", sample_rate=1.0, steps=5, terms=_terms(9.0))
    assert path.read_text() == good  # the old ledger, whole
    path.write_text(good[: len(good) // 2])
    with pytest.raises(PrivacyError, match="is damaged .* restored from backup"):
        ledger.epsilon("s", DELTA)
    path.write_text(
        json.dumps(
            {"format": 1, "studies": {"s": {"entries": [{"noise_multiplier": 1.0, "sample_rate": 7.0, "steps": 3}]}}}
        )
    )
    with pytest.raises(PrivacyError, match="invalid entry"):
        ledger.charge("s", sample_rate=1.0, steps=5, terms=_terms(3.0))


def test_privacy_status_prints_spent_and_remaining(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        '[site]\nid = "A"\nmanifest = "m.csv"\nschema = "s.json"\n[coordinator]\naddress = "c:1"\n'
        "insecure = true\n[privacy]\nmax-epsilon = 3.0\n"
    )
    assert main(["privacy", "status", str(config)]) == 0
    assert "no study has spent" in capsys.readouterr().out
    charge = PrivacyLedger(tmp_path / "privacy-ledger.json").charge(
        "brca", sample_rate=1.0, steps=4, terms=_terms(3.0, noise=4.0)
    )
    assert main(["privacy", "status", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    (row,) = status["studies"]
    assert (row["study"], row["rounds"], row["steps"]) == ("brca", 1, 4)
    assert row["epsilon"] == pytest.approx(charge.epsilon_after)
    assert row["remaining"] == pytest.approx(3.0 - charge.epsilon_after)
    assert main(["privacy", "status", str(config)]) == 0
    assert "brca" in capsys.readouterr().out


# --- a deleted ledger is not an empty one (issue 16 item 7) ------------------------------------------------


def _spend(ledger: PrivacyLedger, study: str = "s") -> None:
    ledger.charge(study, sample_rate=0.25, steps=4, terms=_terms(5.0, noise=1.0))


def test_first_ever_start_reads_a_missing_ledger_as_empty_and_can_charge(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.json", audit_log=tmp_path / "audit.jsonl")
    ledger.check_present()  # no ledger, no marker, no audit log: a site that never trained
    assert ledger.studies() == {}
    _spend(ledger)
    assert ledger.epsilon("s", DELTA) > 0 and ledger.marker.is_file()


def test_a_ledger_deleted_after_a_charge_is_refused_because_of_its_marker(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.json")
    _spend(ledger)
    ledger.path.unlink()
    for read in (ledger.studies, lambda: ledger.epsilon("s", DELTA), lambda: _spend(ledger)):
        with pytest.raises(LedgerMissing, match=r"privacy-ledger\.json is missing.*marker.*restored from backup"):
            read()
    assert not ledger.path.exists()  # the refused charge did not start a fresh, empty ledger


def test_a_ledger_and_marker_deleted_are_still_refused_when_the_audit_log_shows_spending(tmp_path: Path) -> None:
    from fedfusion.client.audit import AuditLog

    audit = tmp_path / "state" / "audit.jsonl"  # another folder than the ledger's, as in the shipped deployments
    audit.parent.mkdir()
    log = AuditLog(audit, "A")
    log.record_reply({}, {"num-examples": 8}, run_id=1, server_round=1, message_type="evaluate")
    log.record_reply({}, {"num-examples": 8, "epsilon": 0.7}, run_id=1, server_round=1, message_type="train")
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.json", audit_log=audit, site_id="A")
    with pytest.raises(LedgerMissing, match=r"audit\.jsonl line 2 records a reply with ε = 0\.7"):
        ledger.studies()
    # Sites sharing a host may share the log but not the ledger: A's spending says nothing about B's ledger.
    assert PrivacyLedger(tmp_path / "ledger-B.json", audit_log=audit, site_id="B").studies() == {}
    quiet = tmp_path / "quiet.jsonl"  # replies without ε (DP off) are no evidence of spending
    AuditLog(quiet, "A").record_reply({}, {"num-examples": 8}, run_id=1, server_round=1, message_type="train")
    assert PrivacyLedger(tmp_path / "other-ledger.json", audit_log=quiet).studies() == {}


def _site_toml(folder: Path, manifest: Path, schema: Path, extra: str = "") -> Path:
    config = folder / "site.toml"
    config.write_text(f'[site]\nid = "A"\nmanifest = "{manifest}"\nschema = "{schema}"\ndevice = "cpu"\n'
                      '[coordinator]\naddress = "127.0.0.1:1"\ninsecure = true\n'
                      "[privacy]\nmax-epsilon = 1.0\ndelta = 1e-5\n" + extra)
    return config


def test_privacy_status_and_site_start_refuse_a_missing_ledger(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = _site_toml(tmp_path, tmp_path / "m.csv", tmp_path / "s.json")
    assert main(["privacy", "status", str(config)]) == 0  # first start: nothing spent, nothing missing
    assert "no study has spent" in capsys.readouterr().out
    _spend(PrivacyLedger(tmp_path / "privacy-ledger.json"))
    (tmp_path / "privacy-ledger.json").unlink()
    assert main(["privacy", "status", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: privacy ledger") and "is missing" in err and len(err.splitlines()) == 1
    assert main(["site", "start", str(config)]) != 0  # before reading the data or starting any process
    assert "is missing" in capsys.readouterr().err


# --- renaming the study buys nothing (issue 16 item 5), through the real ClientApp train handler -----------


def _train(app_config: dict, node_config: dict, schema_path: Path) -> object:
    """One train message through the real ClientApp (audit mod, refusal mods, handler) at site A."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedfusion.client.app import make_client_app
    from fedfusion.client.runtime import load_site
    from fedfusion.common.config import ModelConfig
    from fedfusion.common.flower_adapter import message_identity
    from fedfusion.common.records import model_to_arrays

    site = load_site(node_config["manifest"], str(schema_path), "A", "cpu")
    arrays = model_to_arrays(site.build_model(ModelConfig(fusion="concat")))
    with message_identity(task_id=1, run_id=7, node_id=5):  # as Flower's runtime sets it for run 7 on node 5
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=5, message_type="train")
        return make_client_app(app_config)(msg, Context(run_id=7, node_id=5, node_config=node_config,
                                                        state=RecordDict(), run_config={}))


def test_a_new_study_name_is_refused_at_the_all_studies_cap_and_the_ledger_is_unchanged(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    from fedfusion.client.daemon import SiteConfig
    from fedfusion.common.records import REFUSED_KEY, SITE_KEY
    from tests.dashboard_runs import toy_schema
    from tests.sitegen import make_site

    schema_path = toy_schema().save(tmp_path / "schema.json")
    manifest = make_site(tmp_path / "data", n=40, seed=1)
    config = _site_toml(tmp_path, manifest, schema_path)  # max-epsilon = 1, no max-epsilon-all-studies
    cfg = SiteConfig.load(config)
    assert cfg.privacy.max_epsilon_all_studies == 1.0  # the default: the per-study cap
    node_config = parse_config_args([cfg.node_config()])  # what `site start` hands the SuperNode
    run = {"schema": str(schema_path), "fusion": "concat", "seed": 1, "num-server-rounds": 1, "local-epochs": 1,
           "local-batch-size": 16, "dp-mode": "sample"}

    spent = _train({**run, "study": "study-a"}, node_config, schema_path)  # σ calibrated: round 1 ends at the cap
    assert not spent.has_error() and REFUSED_KEY not in spent.content[SITE_KEY], spent.content
    ledger = PrivacyLedger.for_policy(cfg.privacy)
    assert 0.9 <= ledger.epsilon("study-a", 1e-5) <= 1.0
    before = ledger.path.read_bytes()

    renamed = _train({**run, "study": "study-b"}, node_config, schema_path)
    refusal = str(renamed.content[SITE_KEY][REFUSED_KEY])
    assert "study 'study-b'" in refusal and "max-epsilon-all-studies = 1" in refusal, refusal
    assert "arrays" not in renamed.content  # nothing trained, nothing sent
    assert ledger.path.read_bytes() == before and "study-b" not in ledger.studies()

    # The ledger deleted after that: the audit log (beside site.toml) shows ε spent, so train is refused too.
    ledger.path.unlink()
    ledger.marker.unlink()
    again = _train({**run, "study": "study-a"}, node_config, schema_path)
    assert "is missing" in str(again.content[SITE_KEY][REFUSED_KEY]) and "audit.jsonl line" in str(
        again.content[SITE_KEY][REFUSED_KEY])
    assert not ledger.path.exists()
