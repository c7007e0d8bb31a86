"""Files a coordinator collects after a run: metrics CSVs, plots and a Markdown report.

Everything here is derived from what sites chose to send (aggregate metrics, example counts):
no prediction, no patient value ever reaches the server.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedfusion.common.plots import plot_bars, plot_curves
from fedfusion.common.records import EPSILON_KEY
from fedfusion.common.results import markdown_table, write_json, write_rows
from fedfusion.server.federation import FederationResult


def delivered_evaluations(result: FederationResult) -> list[dict[str, Any]]:
    """The sites' evaluate rows of the delivered model: ``result.selected_round`` (model-selection),
    or the last evaluated round when that round was not evaluated."""
    evaluations = [m for m in result.site_metrics if m["phase"] == "evaluate"]
    if not evaluations:
        return []
    rounds = {int(m["round"]) for m in evaluations}
    chosen = int(result.selected_round) if int(result.selected_round) in rounds else max(rounds)
    return [m for m in evaluations if int(m["round"]) == chosen]


def final_site_metrics(result: FederationResult) -> dict[str, dict[str, float]]:
    """Each site's metrics of the delivered global model on its own test split."""
    return {m["site"]: {k: v for k, v in m.items() if k not in ("round", "phase", "site")}
            for m in delivered_evaluations(result)}


def epsilon_rows(result: FederationResult) -> list[dict[str, Any]]:
    """ε each site reported per round (sample-level DP): ``{round, site, epsilon, status}``, where
    status is ``trained`` or ``refused`` (a refusal carries the ε spent before it, when known)."""
    rows = [{"round": m["round"], "site": m["site"], "epsilon": float(m[EPSILON_KEY]), "status": "trained"}
            for m in result.site_metrics if m["phase"] == "train" and EPSILON_KEY in m]
    rows += [{"round": r["round"], "site": r["site"], "epsilon": float(r.get(EPSILON_KEY, math.nan)),
              "status": "refused"} for r in result.refusals]
    return sorted(rows, key=lambda r: (r["round"], r["site"]))


def epsilon_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per site, one column per round: ε after it, ``refused`` where the site refused."""
    rounds = sorted({r["round"] for r in rows})
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        cell = f"{r['epsilon']:.3f}" if r["status"] == "trained" else (
            "refused" if math.isnan(r["epsilon"]) else f"refused ({r['epsilon']:.3f})")
        row = table.setdefault(r["site"], {"site": r["site"], **{f"round {n}": "" for n in rounds}})
        row[f"round {r['round']}"] = cell
    return [table[s] for s in sorted(table)]


def _write_privacy_outputs(result: FederationResult, run_dir: Path) -> list[str]:
    """privacy.csv, epsilon_per_site.png and the report's privacy section (empty without DP)."""
    rows = epsilon_rows(result)
    client = [r for r in result.rounds if "client_dp_epsilon" in r]
    lines: list[str] = []
    if rows:
        write_rows(run_dir / "privacy.csv", rows)
        sites = sorted({r["site"] for r in rows})
        per_round: dict[int, dict[str, float]] = {}
        for r in rows:
            if not math.isnan(r["epsilon"]):
                per_round.setdefault(r["round"], {"round": r["round"]})[r["site"]] = r["epsilon"]
        plot_curves([per_round[k] for k in sorted(per_round)], "round", sites, run_dir / "epsilon_per_site.png",
                    title="ε spent per site (sample-level DP, each site's own ledger)")
        lines += ["## Privacy: ε spent per site (sample-level DP)", "",
                  "ε each site reported after each round, for this run's study, from its own ledger "
                  "(counted before the update left the site). `refused`: the site's policy or budget did not "
                  "allow the round.", "", markdown_table(epsilon_table(rows)), ""]
    if client:
        lines += ["## Privacy: client-level DP", "",
                  markdown_table([{"round": r["round"], "client_dp_epsilon": r["client_dp_epsilon"]} for r in client]),
                  ""]
    if result.refusals:
        lines += ["## Refused rounds", "", markdown_table(result.refusals), ""]
    if result.ended_early:
        lines += ["## Run ended early", "", result.ended_early, ""]
    return lines


def _selection_note(result: FederationResult) -> str:
    if result.selection == "best-val":
        return (f"The model of round {result.selected_round}: the best site-weighted validation score over the "
                "rounds (`eval_val_*` columns; `model-selection = \"best-val\"`); test splits were not used to choose.")
    return f"The model of the last round ({result.selected_round})."


def write_run_outputs(result: FederationResult) -> Path:
    """Write metrics.csv, site_metrics.csv, summary.json, PNG plots and report.md into the run folder."""
    run_dir = result.run_dir or Path(".")
    write_rows(run_dir / "metrics.csv", result.rounds)
    write_rows(run_dir / "site_metrics.csv", result.site_metrics)
    per_site = final_site_metrics(result)
    metric = "c_index" if any("c_index" in m for m in per_site.values()) else "auc"
    write_json(run_dir / "summary.json", {"rounds": result.rounds, "final_site_metrics": per_site,
                                          "rejected_replies": result.rejected, "primary_metric": metric,
                                          "refusals": result.refusals, "ended_early": result.ended_early,
                                          "selected_round": result.selected_round, "selection": result.selection})
    plot_curves(result.rounds, "round", [f"eval_{metric}"], run_dir / f"global_{metric}_per_round.png",
                title=f"global model {metric} (site-weighted) per round")
    if per_site:
        plot_bars({s: m.get(metric, float("nan")) for s, m in per_site.items()},
                  run_dir / f"site_{metric}.png", ylabel=metric, title="final global model, per site test split")
    lines = ["# Federated run report", "", f"Run folder: `{run_dir}`", "",
             "## Rounds (site-weighted means of what sites reported)", "",
             markdown_table(result.rounds), "", "## Delivered global model on each site's test split", "",
             _selection_note(result), "",
             markdown_table([{"site": s, **m} for s, m in per_site.items()]), ""]
    if result.rejected:
        lines += ["## Rejected replies", "", markdown_table(result.rejected), ""]
    lines += _write_privacy_outputs(result, run_dir)
    (run_dir / "report.md").write_text("\n".join(lines))
    return run_dir / "report.md"

