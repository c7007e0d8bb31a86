"""Differential privacy in Flower's simulation runtime, end to end.

Sample-level DP: one site's budget runs out mid-run; it refuses, the server records the refusal, the
run completes with the other sites, and no site's ε (as reported, and as in its own ledger) ever
passes its budget. A second run of the same study, asking for less ε than already spent, is refused
by every site and ends cleanly. Client-level DP: Flower's wrapper + ``fixedclipping_mod`` train.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedfusion.client.ledger import PrivacyLedger
from fedfusion.common.config import Schema
from fedfusion.simulations.simulate import run_simulated_federation
from tests.sitegen import make_site

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

SITES = ("A", "B", "C")
CAPS = {"A": 8.0, "B": 20.0, "C": 20.0}  # σ = 1, q = 0.5, 2 steps a round: A has room for 2 rounds (ε 7.41)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small sites (30 cases: 18 train, batch 16 -> 2 DP steps a round at sample rate 0.5)."""
    root = tmp_path_factory.mktemp("dp-fed")
    (root / "images").mkdir()
    for k, site in enumerate(SITES):
        path = make_site(root / f"tmp{site}", n=30, seed=k)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        for name in frame["image"]:
            (root / "images" / f"{site}-{Path(name).name}").write_bytes((path.parent / name).read_bytes())
        frame["image"] = [f"images/{site}-{Path(n).name}" for n in frame["image"]]
        frame["case_id"] = site + frame["case_id"]
        frame.to_csv(root / f"site-{site}.csv", index=False)
    return root


def _config(schema: Path, data: Path, run_dir: Path, rounds: int, **extra: object) -> dict:
    return {
        "num-server-rounds": rounds,
        "min-sites": 3,
        "seed": 3,
        "schema": str(schema),
        "run-dir": str(run_dir),
        "data-dir": str(data),
        "sites": ",".join(SITES),
        "local-epochs": 1,
        "local-batch-size": 16,
        "local-lr": 3e-3,
        "fusion": "attention",
        **extra,
    }


def test_site_out_of_budget_refuses_and_the_run_goes_on(data_dir: Path, schema: Schema, tmp_path: Path) -> None:
    schema_path = schema.save(tmp_path / "schema.json")
    policy = tmp_path / "policies.toml"
    policy.write_text("[privacy]\nmax-epsilon = 20.0\n[privacy.sites.A]\nmax-epsilon = 8.0\n")
    dp = {"dp-mode": "sample", "dp-noise-multiplier": 1.0, "study": "brca-dp", "sim-privacy-policy": str(policy)}

    result = run_simulated_federation(_config(schema_path, data_dir, tmp_path / "run", 3, **dp), len(SITES))

    assert [r["round"] for r in result.rounds] == [0, 1, 2, 3] and not result.ended_early
    trained = {(m["round"], m["site"]): m["epsilon"] for m in result.site_metrics if m["phase"] == "train"}
    assert sorted(r for r, s in trained if s == "A") == [1, 2]
    assert sorted(r for r, s in trained if s == "B") == [1, 2, 3]
    assert [(r["round"], r["site"]) for r in result.refusals] == [(3, "A")]
    assert "past this site's budget of 8" in result.refusals[0]["reason"]
    assert all(eps <= CAPS[site] for (_, site), eps in trained.items())
    assert all(r["epsilon"] <= CAPS["A"] for r in result.refusals)
    for site in SITES:  # each site's own ledger, beside the policy file
        ledger = PrivacyLedger(tmp_path / f"privacy-ledger-{site}.json")
        assert 0 < ledger.epsilon("brca-dp", 1e-5) <= CAPS[site]
    assert result.rounds[3]["sites_refused"] == 1 and result.rounds[3]["sites_trained"] == 2
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Privacy: ε spent per site" in report and "refused (7.410)" in report
    assert (tmp_path / "run" / "epsilon_per_site.png").exists()

    # The same study again, asking for less ε than every site has already spent: all refuse, clean end.
    again = run_simulated_federation(
        _config(schema_path, data_dir, tmp_path / "again", 3, **{**dp, "target-epsilon": 5.0}), len(SITES)
    )
    assert {r["site"] for r in again.refusals} == set(SITES) and again.ended_early.startswith("round 1:")
    assert [r["round"] for r in again.rounds] == [0, 1] and (tmp_path / "again" / "model.pt").exists()


def test_client_level_dp_trains_through_flowers_wrapper_and_clipping_mod(
    data_dir: Path, schema: Schema, tmp_path: Path
) -> None:
    schema_path = schema.save(tmp_path / "schema.json")
    cfg = _config(
        schema_path,
        data_dir,
        tmp_path / "client-dp",
        2,
        **{"dp-mode": "client", "client-dp-noise-multiplier": 0.5, "client-dp-clipping-norm": 0.5},
    )
    result = run_simulated_federation(cfg, len(SITES))
    assert [r.get("sites_trained") for r in result.rounds[1:]] == [3, 3] and not result.refusals
    assert 0 < result.rounds[1]["client_dp_epsilon"] < result.rounds[2]["client_dp_epsilon"]
    assert not result.rejected
