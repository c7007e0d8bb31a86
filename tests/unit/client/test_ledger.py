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
from fedfusion.client.ledger import PrivacyLedger
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
