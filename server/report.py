"""Files a coordinator collects after a run: metrics CSVs, plots and a Markdown report.

Everything here is derived from what sites chose to send (aggregate metrics, example counts):
no prediction, no patient value ever reaches the server.
"""

from __future__ import annotations

from pathlib import Path

from fedfusion.common.plots import plot_bars, plot_curves
from fedfusion.common.results import markdown_table, write_json, write_rows
from fedfusion.server.federation import FederationResult


def final_site_metrics(result: FederationResult) -> dict[str, dict[str, float]]:
    """Each site's metrics of the final global model on its own test split."""
    evaluations = [m for m in result.site_metrics if m["phase"] == "evaluate"]
    if not evaluations:
        return {}
    last = max(m["round"] for m in evaluations)
    return {m["site"]: {k: v for k, v in m.items() if k not in ("round", "phase", "site")}
            for m in evaluations if m["round"] == last}


def write_run_outputs(result: FederationResult) -> Path:
    """Write metrics.csv, site_metrics.csv, summary.json, PNG plots and report.md into the run folder."""
    run_dir = result.run_dir or Path(".")
    write_rows(run_dir / "metrics.csv", result.rounds)
    write_rows(run_dir / "site_metrics.csv", result.site_metrics)
    per_site = final_site_metrics(result)
    metric = "c_index" if any("c_index" in m for m in per_site.values()) else "auc"
    write_json(run_dir / "summary.json", {"rounds": result.rounds, "final_site_metrics": per_site,
                                          "rejected_replies": result.rejected, "primary_metric": metric})
    plot_curves(result.rounds, "round", [f"eval_{metric}"], run_dir / f"global_{metric}_per_round.png",
                title=f"global model {metric} (site-weighted) per round")
    if per_site:
        plot_bars({s: m.get(metric, float("nan")) for s, m in per_site.items()},
                  run_dir / f"site_{metric}.png", ylabel=metric, title="final global model, per site test split")
    lines = ["# Federated run report", "", f"Run folder: `{run_dir}`", "",
             "## Rounds (site-weighted means of what sites reported)", "",
             markdown_table(result.rounds), "", "## Final global model on each site's test split", "",
             markdown_table([{"site": s, **m} for s, m in per_site.items()]), ""]
    if result.rejected:
        lines += ["## Rejected replies", "", markdown_table(result.rejected), ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return run_dir / "report.md"

