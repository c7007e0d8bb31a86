"""Files a study leaves behind: results/summary CSV + JSON, PNG plots, report.md and report.html.

Summaries follow FLamby: for each seed, the mean over sites (each site's own test split; NaN
sites, e.g. an AUC on a one-class test split, are skipped); then mean +/- sd (sample sd, ddof=1)
over seeds. The figures come from :mod:`fedfusion.simulations.study_plots`.

The HTML report is self-contained (images inlined as base64, no script, no CDN) so it can be mailed
to a clinician or archived with the study; report.md links the PNGs in ``plots/`` relatively.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfusion.common.results import markdown_table, write_json, write_rows
from fedfusion.simulations import study_statistics as stats
from fedfusion.simulations.study_plots import (
    mean_sd,
    plot_calibration,
    plot_epsilon,
    plot_fusion_vs_unimodal,
    plot_km,
    plot_roc,
    plot_rounds,
    plot_sites,
    plot_vs_local,
)

if TYPE_CHECKING:
    from fedfusion.simulations.experiment import StudyRecord

#: Families whose methods make the main table and the curves.
MAIN_FAMILIES = ("baseline", "best-local", "federated")
#: Families compared with pooled / best local-only / each site's local-only, paired by seed.
COMPARED_FAMILIES = ("federated", "personalised")
FAIR_BEST_LOCAL = "best local-only (val-chosen)"
SECONDARY = ("balanced_accuracy", "accuracy", "ece", "brier")
_PLOTS = "plots"


# ----------------------------------------------------------------------------------- numbers


def _site_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def per_seed_means(rows: Sequence[dict[str, Any]], method: str, metric: str) -> dict[int, float]:
    """{seed: mean over sites} of one method's ``metric`` (NaN sites skipped)."""
    seeds: dict[int, list[float]] = {}
    for r in rows:
        if r["method"] == method:
            seeds.setdefault(int(r["seed"]), []).append(float(r.get(metric, math.nan)))
    return {s: _site_mean(v) for s, v in sorted(seeds.items())}


def _choose_local(rows: list[dict[str, Any]], key: str) -> str | None:
    """The site k whose local model has the best mean over seeds of its mean over sites of ``key``."""
    owners = sorted({str(r["model_site"]) for r in rows if r["family"] == "local-cross"})
    score = {k: mean_sd(list(per_seed_means(rows, f"local model {k}", key).values()))[0] for k in owners}
    ranked = [k for k in owners if not math.isnan(score[k])]
    return max(ranked, key=lambda k: score[k]) if ranked else None


def add_best_local(rows: list[dict[str, Any]], metric: str) -> str | None:
    """Append FLamby's *best local-only* rows: the copies of the site-k local model's rows on every
    site, for the k whose model is best on the mean over seeds of its mean over sites. Returns k.

    Chosen on the same test scores it is then reported with, so it is *optimistic*: with many sites
    the maximum of noisy test scores is biased upwards. :func:`add_fair_best_local` is the fair twin."""
    best = _choose_local(rows, metric)
    if best is not None:
        rows += [{**r, "method": "best local-only", "family": "best-local", "chosen_on": "test"}
                 for r in list(rows) if r["method"] == f"local model {best}"]
    return best


def add_fair_best_local(rows: list[dict[str, Any]], metric: str) -> str | None:
    """Append *best local-only (val-chosen)* rows: as :func:`add_best_local`, but the site model is
    chosen on its validation scores (``val_<metric>`` of the local-cross rows: every site's val split)
    and then reported on test, as a study that may not peek at test would. None when the record has
    no validation scores (a study run before they were recorded, or sites without val rows)."""
    best = _choose_local(rows, f"val_{metric}")
    if best is not None:
        rows += [{**r, "method": FAIR_BEST_LOCAL, "family": "best-local", "chosen_on": "validation"}
                 for r in list(rows) if r["method"] == f"local model {best}"]
    return best


def summarise(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One entry per method: mean +/- sd over seeds of the mean over sites, and the per-seed values."""
    out: list[dict[str, Any]] = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        seeds = per_seed_means(rows, method, metric)
        mean, sd = mean_sd(list(seeds.values()))
        entry: dict[str, Any] = {"method": method, "family": mine[0]["family"], "modalities": mine[0]["modalities"],
                                 f"{metric}_mean": mean, f"{metric}_sd": sd, "n_seeds": len(seeds),
                                 "n_sites": len({r["site"] for r in mine}),
                                 "per_seed": ";".join(f"{s}:{v:.4f}" for s, v in seeds.items())}
        if "base_method" in mine[0]:
            entry["base_method"] = mine[0]["base_method"]
        if "model_site" in mine[0]:
            entry["model_site"] = mine[0]["model_site"]
        for extra in SECONDARY:
            if extra != metric and any(extra in r for r in mine):
                entry[f"{extra}_mean"], entry[f"{extra}_sd"] = mean_sd(
                    list(per_seed_means(rows, method, extra).values()))
        out.append(entry)
    return out


def summarise_by_site(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """(method, site): mean +/- sd over seeds."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], str(r["site"])), []).append(float(r.get(metric, math.nan)))
    out = []
    for (method, site), values in groups.items():
        mean, sd = mean_sd(values)
        out.append({"method": method, "site": site, f"{metric}_mean": mean, f"{metric}_sd": sd,
                    "n_seeds": len(values)})
    return out


def _cell(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


# ----------------------------------------------------------------------------------- document


class _Doc:
    """Blocks rendered twice: Markdown (images linked) and self-contained HTML (images inlined)."""

    def __init__(self, root: Path) -> None:
        self.root, self.blocks = root, []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, rows: list[dict[str, Any]]) -> None:
        self.blocks.append(("table", rows))

    def image(self, path: Path | None, caption: str) -> None:
        if path is not None and path.exists():
            self.blocks.append(("img", path, caption))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            if block[0] == "h":
                out.append("#" * block[1] + " " + block[2])
            elif block[0] == "p":
                out.append(block[1])
            elif block[0] == "table":
                out.append(markdown_table(block[1], digits=3))
            else:
                out.append(f"![{block[2]}]({block[1].relative_to(self.root).as_posix()})\n\n*{block[2]}*")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        body = []
        for block in self.blocks:
            if block[0] == "h":
                body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif block[0] == "p":
                body.append(f"<p>{_inline(block[1])}</p>")
            elif block[0] == "table":
                body.append(_html_table(block[1]))
            else:
                data = base64.b64encode(block[1].read_bytes()).decode()
                body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
                 "padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
                 "img{max-width:100%}figcaption{color:#555;font-size:13px}code{background:#f3f3f3;padding:0 3px}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escape, then render the Markdown the report uses inline: `code` and **bold**."""
    parts = html.escape(text).split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_inline(fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------------- report


def write_study_outputs(record: StudyRecord) -> Path:
    """results.csv, rounds.csv, summary.csv/json, summary_by_site.csv, plots/, report.md, report.html."""
    study, out, metric = record.study, record.out_dir, record.metric
    rows = record.rows
    best = add_best_local(rows, metric)
    fair = add_fair_best_local(rows, metric)
    write_rows(out / "results.csv", rows)
    write_rows(out / "rounds.csv", record.rounds)
    summary = summarise(rows, metric)
    by_site = summarise_by_site(rows, metric)
    write_rows(out / "summary.csv", summary)
    write_rows(out / "summary_by_site.csv", by_site)
    lookup = {s["method"]: s for s in summary}
    statistics = compute_statistics(record, summary, best, fair)
    for name, table in (("site_counts", statistics["counts"]), ("intervals", statistics["interval_rows"]),
                        ("paired_differences", statistics["paired"]), ("paired_by_site", statistics["paired_by_site"])):
        write_rows(out / f"{name}.csv", table)
    fusion, bars = fusion_table(summary, rows, metric, record.modalities)
    write_json(out / "summary.json", {
        "study": study.name, "dataset": record.dataset_name, "partition": study.partition, "metric": metric,
        "seeds": list(study.seeds), "rounds": study.rounds, "local_epochs": study.local_epochs,
        "fusion": study.fusion, "best_local_site": best, "best_local_site_fair": fair,
        "methods": {s["method"]: {"family": s["family"], "mean": s[f"{metric}_mean"], "sd": s[f"{metric}_sd"],
                                  "n_seeds": s["n_seeds"], "per_seed": per_seed_means(rows, s["method"], metric)}
                    for s in summary},
        "by_site": by_site, "fusion_vs_unimodal": fusion, "statistics": statistics["json"], "notes": record.notes,
        "failures": [{k: v for k, v in f.items() if k != "traceback"} for f in record.failures],
        "ended_early": record.ended_early, "seconds": record.seconds})
    main = [s["method"] for s in summary if s["family"] in MAIN_FAMILIES]
    curves = [m for m in main if m in record.predictions]
    plots = out / _PLOTS
    doc = _Doc(out)
    simulated = study.partition != "natural"
    doc.h(1, f"fedfusion study: {study.name}")
    doc.p(f"Data set `{record.dataset_name}` ({record.task}, modalities {', '.join(record.modalities)}), partition "
          f"`{study.partition}`" + (" -- **SIMULATED sites**" if simulated else " -- the data set's real sites")
          + f"; {len(study.seeds)} seed(s) {list(study.seeds)}; {study.rounds} federated rounds x "
          f"{study.local_epochs} local epochs; fusion `{study.fusion}`; baselines up to {study.baseline_epochs} "
          f"epochs with early stopping on each training set's val split. Ran in {record.seconds / 60:.1f} min.")
    if study.sites_dir:
        doc.p(f"Sites: the sub-folders of `{study.sites_dir}` (your data). Each site's test split is its own "
              "`split` column or, where it has none, a split made at the site: seeded with the study seed, "
              "stratified on " + ("the label" if record.task == "classification" else "the event") + " "
              "(common/site_split.py); `runs/seed-N/data/splits.json` lists each site's counts and source.")
    doc.p(f"Every number is a test-split **{metric}**. Per method: for each seed the mean over sites (each "
          "site's own test split), then mean ± sd over seeds (FLamby's convention). `pooled` trains one model on "
          "the union of the sites' training rows (what no hospital may do); `local-only` is each site's own model "
          "on its own test split; `best local-only` is FLamby's single site model that is best on average over all "
          f"sites' test splits{f' (site {best})' if best else ''} -- **optimistic**: chosen on the very test "
          f"scores it is reported with; `{FAIR_BEST_LOCAL}` is the fair version, chosen on the sites' validation "
          "splits" + (f" (site {fair})" if fair else " (not available: this record has no validation scores of "
                      "the local models)") + ". Federated methods are scored by the sites on "
          "their test splits with the final global model.")
    doc.h(2, "Methods")
    doc.table(_method_table(summary, by_site, main, metric))
    _statistics_section(doc, statistics, metric)
    secondary = [s for s in summary if s["method"] in main and any(f"{k}_mean" in s for k in SECONDARY)]
    if secondary:
        doc.h(3, "Other metrics (mean ± sd over seeds)")
        doc.table([{"method": s["method"], **{k: _cell(s[f"{k}_mean"], s[f"{k}_sd"]) for k in SECONDARY
                                              if f"{k}_mean" in s}} for s in secondary])
    doc.image(plot_rounds(record.rounds, lookup, metric, plots / f"rounds_{metric}.png"),
              f"{metric} per round, mean over sites (band: ± sd over seeds)")
    doc.image(plot_sites(by_site, main, metric, plots / f"sites_{metric}.png", statistics["bars"]),
              f"{metric} per site and method (error bars: 95 % bootstrap CI over test cases, where recorded)")
    doc.image(plot_vs_local(by_site, statistics["compared"], metric, plots / f"vs_local_{metric}.png"),
              f"per site: each federated method vs the site's own local-only model ({metric}, mean over seeds)")
    if record.task in ("classification", "both"):
        doc.image(plot_roc(record.predictions, curves, plots / "roc.png"), "ROC curves")
        doc.image(plot_calibration(record.predictions, curves, plots / "calibration.png"), "calibration curves")
    if record.task in ("survival", "both"):
        km, km_table = plot_km(record.predictions, curves, plots / "km.png")
        doc.image(km, "Kaplan-Meier curves by predicted risk group (median split within each site and seed)")
        if km_table:
            doc.table(km_table)
    doc.image(plot_epsilon(record.rounds, plots / "epsilon.png"), "ε per round")
    if fusion:
        doc.h(2, "Does fusion beat the best single modality?")
        doc.p("Each modality subset is trained with the same method and scored on the test rows that have it "
              "(with modality-missing skew these are fewer rows than the fused model is scored on). Δ = fusion − "
              "best subset, per seed, then mean ± sd.")
        doc.table(fusion)
        doc.image(plot_fusion_vs_unimodal(bars, metric, plots / "fusion_vs_unimodal.png"), "fusion vs subsets")
    for family, title, text in (
        ("ablation-test", "Modality ablation at test time",
         "The fused model scored with one modality hidden (its learned 'absent' embedding instead), on the test "
         "rows that keep another modality: the drop says how much the model leans on that modality."),
        ("leave-one-site-out", "Leave one site out",
         "Trained on every other site; scored on the held-out site's test split (the rows every other method is "
         "scored on there)."),
        ("tabular", "Tabular baselines (clinical + omics table, no images)",
         "Trees and linear/Cox models, pooled (scored on every site) and local-only; they cannot be federated by "
         "averaging."),
        ("local-cross", "Each site's local model on every site", "Rows: the model of one site; mean over all sites."),
    ):
        methods = [s["method"] for s in summary if s["family"] == family]
        if methods:
            doc.h(2, title)
            doc.p(text)
            doc.table(_method_table(summary, by_site, methods, metric))
    if record.notes:
        doc.h(2, "Notes")
        for note in record.notes:
            doc.p(f"- {note}")
    if record.failures:
        doc.h(2, "Failed steps")
        doc.table([{"seed": f["seed"], "step": f["step"], "error": f["error"]} for f in record.failures])
    doc.h(2, "Files")
    doc.p("`results.csv` (one row per seed × method × site), `summary.csv` / `summary.json` (per method), "
          "`summary_by_site.csv`, `site_counts.csv`, `intervals.csv` (bootstrap CIs), `paired_differences.csv` and "
          "`paired_by_site.csv`, `rounds.csv` (per seed, method and round), `plots/`, `runs/seed-N/` (data and "
          "federated run folders; `fedfusion explain runs/seed-N/<method>` explains a global model).")
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(f"fedfusion study: {study.name}"))
    return out / "report.md"


def compute_statistics(record: StudyRecord, summary: list[dict[str, Any]], best: str | None, fair: str | None,
                       resamples: int = stats.RESAMPLES) -> dict[str, Any]:
    """Test counts, bootstrap intervals and paired differences of a study (module
    :mod:`~fedfusion.simulations.study_statistics`), as tables, plot inputs and JSON.

    The best local-only rows are copies of one site model's rows, so their per-case predictions are
    that model's (``local model <site>``); a record without them gets no interval."""
    rows, metric = record.rows, record.metric
    preds = dict(record.predictions)
    for name, site in (("best local-only", best), (FAIR_BEST_LOCAL, fair)):
        if site is not None and preds.get(f"local model {site}"):
            preds[name] = preds[f"local model {site}"]
    methods = [s["method"] for s in summary if s["family"] != "local-cross"]
    cache: dict[int, dict[str, Any]] = {}  # best local-only shares its predictions with a local model
    intervals: dict[str, dict[str, Any] | None] = {}
    for m in methods:
        found = preds.get(m)
        if found and id(found) not in cache:
            cache[id(found)] = stats.bootstrap_intervals(found, metric, resamples=resamples)
        intervals[m] = cache[id(found)] if found else None
    sites = sorted({str(r["site"]) for r in rows if r["method"] in methods})
    compared = [s["method"] for s in summary if s["family"] in COMPARED_FAMILIES]
    references = (("pooled", "pooled"),
                  (FAIR_BEST_LOCAL, "best local-only (fair: chosen on validation)"),
                  ("best local-only", "best local-only (optimistic: chosen on test)"),
                  ("local-only", "local-only (each site's own model), mean over sites"))
    paired = stats.paired_rows(compared, references, lambda m: per_seed_means(rows, m, metric))
    by_site_paired = stats.paired_by_site(rows, compared, metric)
    interval_rows = []
    for method, found in intervals.items():
        if found is None:
            interval_rows.append({"method": method, "site": "", "estimate": math.nan, "ci_low": math.nan,
                                  "ci_high": math.nan, "resamples": 0, "note": stats.NOT_RECORDED})
            continue
        for site, (estimate, low, high) in [*found["sites"].items(), ("mean over sites", found["mean"])]:
            interval_rows.append({"method": method, "site": site, "estimate": estimate, "ci_low": low,
                                  "ci_high": high, "resamples": resamples, "note": ""})
    counts = stats.site_counts(rows)
    return {
        "counts": counts, "methods": methods, "sites": sites, "intervals": intervals,
        "interval_rows": interval_rows, "paired": paired, "paired_by_site": by_site_paired, "compared": compared,
        "best": best, "fair": fair,
        "bars": {(m, site): (iv[1], iv[2]) for m, found in intervals.items() if found
                 for site, iv in found["sites"].items()},
        "json": {"site_counts": counts, "intervals": interval_rows, "paired_differences": paired,
                 "paired_by_site": by_site_paired, "level": stats.LEVEL, "resamples": resamples},
    }


def _statistics_section(doc: _Doc, statistics: dict[str, Any], metric: str) -> None:
    if statistics["counts"]:
        doc.h(3, "Test sets per site")
        doc.p("Cases in each site's test split and the events (survival) or positives (classification) its "
              f"{metric} rests on; `a–b` when the seed draws the split. A C-index from 10 events or an AUC from 8 "
              "positives moves by ±0.1 between equally good models.")
        doc.table(statistics["counts"])
    doc.h(3, "95 % bootstrap intervals (test-case sampling)")
    doc.p(f"Percentile bootstrap, {statistics['json']['resamples']} resamples of each (seed, site) test split, "
          "seeded; every method sees the same resampled patients. Each resample recomputes the reported number "
          "(a site: mean over seeds; the mean over sites: FLamby's). The interval covers which patients happened "
          "to be tested, not seed-to-seed spread (the ± sd above). Estimates come from the stored per-case "
          "predictions; a method without them says so.")
    doc.table(stats.interval_table(statistics["methods"], statistics["intervals"], statistics["sites"], metric))
    if statistics["paired"]:
        doc.h(3, "Paired differences over seeds")
        doc.p("Method − reference, per seed on FLamby's number (mean over sites), then the mean over seeds with a "
              "Student-t 95 % interval over seeds and the number of seeds in which the method is better. "
              "`best local-only (optimistic)` was chosen on the test scores it is compared on, so a Δ against it "
              "understates the method; the fair one was chosen on validation.")
        doc.table(stats.paired_report_rows(statistics["paired"]))
    if statistics["paired_by_site"]:
        doc.h(3, "Per site: vs that site's own local-only model")
        doc.p("Would joining have beaten training alone at this site? Δ paired by seed on the site's test split.")
        doc.table(stats.paired_report_rows(statistics["paired_by_site"], key="site"))


def _method_table(summary: list[dict[str, Any]], by_site: list[dict[str, Any]], methods: list[str],
                  metric: str) -> list[dict[str, Any]]:
    lookup = {(r["method"], r["site"]): r for r in by_site}
    sites = sorted({r["site"] for r in by_site if r["method"] in methods})
    table = []
    for s in summary:
        if s["method"] not in methods:
            continue
        row = {"method": s["method"], f"{metric} (mean ± sd over seeds)": _cell(s[f"{metric}_mean"], s[f"{metric}_sd"])}
        for site in sites:
            cell = lookup.get((s["method"], site))
            row[site] = _cell(cell[f"{metric}_mean"], cell[f"{metric}_sd"]) if cell else ""
        table.append(row)
    return table


def fusion_table(summary: list[dict[str, Any]], rows: list[dict[str, Any]], metric: str,
                 modalities: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per base method: fused model, each modality subset, the best subset and Δ (paired by seed);
    plus one bar per (base method, model) for :func:`plot_fusion_vs_unimodal`."""
    out: list[dict[str, Any]] = []
    all_bars: list[dict[str, Any]] = []
    subset_families = ("unimodal", "ablation-trained")
    for base in dict.fromkeys(s.get("base_method") for s in summary if s["family"] in subset_families):
        fused = next((s for s in summary if s["method"] == base), None)
        subsets = [s for s in summary if s.get("base_method") == base and s["family"] in subset_families]
        if fused is None or not subsets:
            continue
        best = max(subsets, key=lambda s: -math.inf if math.isnan(s[f"{metric}_mean"]) else s[f"{metric}_mean"])
        fused_seeds = per_seed_means(rows, base, metric)
        best_seeds = per_seed_means(rows, best["method"], metric)
        delta = mean_sd([fused_seeds[k] - best_seeds[k] for k in fused_seeds if k in best_seeds])
        row: dict[str, Any] = {"method": base, f"fusion ({'+'.join(modalities)})": _cell(fused[f"{metric}_mean"],
                                                                                         fused[f"{metric}_sd"])}
        bars = [{"base": base, "model": "fusion", "mean": fused[f"{metric}_mean"], "sd": fused[f"{metric}_sd"]}]
        for s in subsets:
            label = s["method"][len(base):].strip(" []")
            row[label] = _cell(s[f"{metric}_mean"], s[f"{metric}_sd"])
            bars.append({"base": base, "model": label, "mean": s[f"{metric}_mean"], "sd": s[f"{metric}_sd"]})
        row["best subset"] = best["method"][len(base):].strip(" []")
        row["Δ fusion − best"] = _cell(*delta)
        row["fusion better?"] = "n/a" if math.isnan(delta[0]) else ("yes" if delta[0] > 0 else "no")
        out.append(row)
        all_bars += bars
    return out, all_bars
