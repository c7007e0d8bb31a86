"""Files a coordinator collects after a run: metrics CSVs, plots and a Markdown report.

Everything here is derived from what sites chose to send (aggregate metrics, example counts):
no prediction, no patient value ever reaches the server.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedfusion.common.plots import chance_level, plot_bars, plot_curves
from fedfusion.common.records import EPSILON_KEY, NOISE_ASKED_KEY, NOISE_KEY, NUM_EXAMPLES
from fedfusion.common.results import markdown_table, write_json, write_rows
from fedfusion.server.federation import FederationResult
from fedfusion.server.model_selection import SELECTION_TEXT


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


#: σ above this multiple of what the run asks: the site's budget was nearly spent and its update is mostly noise.
NOISE_WARNING_RATIO = 2.0


def noise_rows(result: FederationResult) -> list[dict[str, Any]]:
    """σ each site trained with per round and the σ the run asked of it: ``{round, site, sigma, asked}``."""
    return sorted(({"round": int(m["round"]), "site": m["site"], "sigma": float(m[NOISE_KEY]),
                    "asked": float(m.get(NOISE_ASKED_KEY, math.nan))}
                   for m in result.site_metrics if m["phase"] == "train" and NOISE_KEY in m),
                  key=lambda r: (r["round"], r["site"]))


def noise_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (site, round) whose σ exceeds the asked σ by more than :data:`NOISE_WARNING_RATIO`."""
    return [f"site {r['site']} trained round {r['round']} with σ {r['sigma']:.3g} (asked {r['asked']:.3g}): its "
            "budget is nearly spent; its update is mostly noise"
            for r in rows if r["asked"] > 0 and r["sigma"] > NOISE_WARNING_RATIO * r["asked"]]


def rounds_with_noise(result: FederationResult) -> list[dict[str, Any]]:
    """``result.rounds`` plus one ``sigma_<site>`` column per DP site (metrics.csv keeps everything)."""
    by_round: dict[int, dict[str, float]] = {}
    for r in noise_rows(result):
        by_round.setdefault(r["round"], {})[f"sigma_{r['site']}"] = r["sigma"]
    return [{**row, **by_round.get(int(row["round"]), {})} for row in result.rounds]


def rounds_table(rounds: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The rounds as a reader needs them: round, train loss, test and validation metric, ε, sites (counts
    as integers). The other columns (timings, counts, per-site σ) stay in metrics.csv."""
    columns = [("round", "round"), ("train_loss", "train loss"), (f"eval_{metric}", f"test {metric}"),
               (f"eval_val_{metric}", f"val {metric}"), ("train_epsilon", "ε"), ("client_dp_epsilon", "client ε"),
               ("sites_trained", "sites trained"), ("sites_refused", "sites refused")]
    present = [(key, name) for key, name in columns if any(key in r for r in rounds)]
    if not any(float(r.get("sites_refused", 0) or 0) for r in rounds):
        present = [(k, n) for k, n in present if k != "sites_refused"]
    counts = {"round", "sites_trained", "sites_refused"}
    return [{name: (int(r[key]) if key in counts else r[key]) if key in r else "" for key, name in present}
            for r in rounds]


def site_test_sizes(per_site: dict[str, dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per site: test n, events (survival) and the delivered model's metric with its 95 % CI where the
    site sent one: how much each site's number can be trusted."""
    rows = []
    for site, m in per_site.items():
        row: dict[str, Any] = {"site": site, "test n": int(m.get("n", m.get(NUM_EXAMPLES, 0)))}
        if "events" in m:
            row["events"] = int(m["events"])
        row[metric] = float(m.get(metric, math.nan))
        if f"{metric}_ci_low" in m:
            row["95 % CI"] = f"{m[f'{metric}_ci_low']:.3f} to {m[f'{metric}_ci_high']:.3f}"
        rows.append(row)
    return rows


def _write_privacy_outputs(result: FederationResult, run_dir: Path) -> list[str]:
    """privacy.csv, epsilon_per_site.png and the report's privacy section (empty without DP)."""
    rows = epsilon_rows(result)
    client = [r for r in result.rounds if "client_dp_epsilon" in r]
    lines: list[str] = []
    noise = noise_rows(result)
    if noise:
        table: dict[str, dict[str, Any]] = {}
        for r in noise:
            table.setdefault(r["site"], {"site": r["site"], "asked": f"{r['asked']:.3g}"})[f"round {r['round']}"] = (
                f"{r['sigma']:.3g}")
        warnings = noise_warnings(noise)
        lines += ["## Privacy: noise multiplier σ per site", "",
                  *[f"**Warning:** {w}" for w in warnings], *([""] if warnings else []),
                  "σ each site trained with (DP-SGD noise / clipping norm); `asked`: the σ this run's plan needs "
                  "from an unspent budget. A site whose earlier runs spent most of its budget recalibrates to a "
                  "much larger σ to stay within it.", "", markdown_table([table[s] for s in sorted(table)]), ""]
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


def delivered_title(result: FederationResult) -> str:
    """Plot title naming the round whose model is shown (never "final" when it is the best round)."""
    evaluated = {int(m["round"]) for m in delivered_evaluations(result)}
    shown = next(iter(evaluated), int(result.selected_round))
    how = ("best validation" if result.selection != "last" and shown == int(result.selected_round)
           else "last round")
    return f"delivered model, round {shown} ({how})"


def _selection_note(result: FederationResult) -> str:
    if result.selection != "last":
        return (f"The model of round {result.selected_round}: {SELECTION_TEXT[result.selection]} "
                f"(`model-selection = \"{result.selection}\"`); test splits were not used to choose.")
    return f"The model of the last round ({result.selected_round})."


def write_run_outputs(result: FederationResult) -> Path:
    """Write metrics.csv, site_metrics.csv, summary.json, PNG plots and report.md into the run folder."""
    run_dir = result.run_dir or Path(".")
    write_rows(run_dir / "metrics.csv", rounds_with_noise(result))
    write_rows(run_dir / "site_metrics.csv", result.site_metrics)
    per_site = final_site_metrics(result)
    metric = "c_index" if any("c_index" in m for m in per_site.values()) else "auc"
    write_json(run_dir / "summary.json", {"rounds": result.rounds, "final_site_metrics": per_site,
                                          "rejected_replies": result.rejected, "primary_metric": metric,
                                          "refusals": result.refusals, "ended_early": result.ended_early,
                                          "selected_round": result.selected_round, "selection": result.selection})
    plot_curves(result.rounds, "round", [f"eval_{metric}", f"eval_val_{metric}"],
                run_dir / f"global_{metric}_per_round.png", title=f"global model {metric} (site-weighted) per round",
                reference=chance_level(metric))
    if per_site:
        plot_bars({s: m.get(metric, float("nan")) for s, m in per_site.items()}, run_dir / f"site_{metric}.png",
                  ylabel=f"test {metric} per site (95 % CI)", title=delivered_title(result),
                  errors={s: (m[f"{metric}_ci_low"], m[f"{metric}_ci_high"]) for s, m in per_site.items()
                          if f"{metric}_ci_low" in m}, reference=chance_level(metric))
    lines = ["# Federated run report", "", f"Run folder: `{run_dir}`", "",
             "## Delivered global model on each site's test split", "", _selection_note(result), "",
             markdown_table(site_test_sizes(per_site, metric), digits=3), ""]
    lines += [f"**Warning:** {w}" for w in noise_warnings(noise_rows(result))]
    lines += ["", "## Rounds (site-weighted means of what sites reported; every column in `metrics.csv`)", "",
              markdown_table(rounds_table(result.rounds, metric)), "",
              "Every metric each site reported for the delivered model: `site_metrics.csv`.", ""]
    if result.rejected:
        lines += ["## Rejected replies", "", markdown_table(result.rejected), ""]
    lines += _write_privacy_outputs(result, run_dir)
    (run_dir / "report.md").write_text("\n".join(lines))
    return run_dir / "report.md"

