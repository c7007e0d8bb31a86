"""Tables across finished studies: the numbers a README or a benchmark page quotes, recomputed from
each study's ``results.csv`` rather than copied by hand.

``python -m fedfusion.simulations.study_compare OUT [OUT ...]`` prints, in Markdown:

- **methods**: one row per method, one column per study -- the primary metric, FLamby's mean over
  sites per seed, then mean ± sd over seeds (exactly the study report's number);
- **goal**: per study and federated method, the paired-by-seed differences to *best local-only* and
  to *pooled* (mean ± sd, a t 95 % interval over seeds and "better in k/n seeds"), and whether the
  issue's goal holds on the means: federated >= best local-only and federated >= pooled - 0.02;
  studies that recorded validation scores also get the fair, val-chosen best local-only;
- **fusion**: one row per study (e.g. one per Dirichlet alpha), for each method that has unimodal
  arms: the fused model and its best single modality (chosen on the mean over seeds, as the report's
  *Does fusion beat the best single modality?* table does), with the paired Δ.

Why a separate module: each study's report stands alone; a comparison across studies (natural
splits of two data sets, or one data set under three skews) needs the study settings beside the
numbers, and a re-run must regenerate the README's table with one command.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedfusion.common.results import markdown_table
from fedfusion.simulations.study_plots import mean_sd
from fedfusion.simulations.study_report import FAIR_BEST_LOCAL, per_seed_means
from fedfusion.simulations.study_statistics import paired_cell, paired_difference, sign_text

#: The methods of the goal table, in order, when a study has them.
MAIN_METHODS = ("pooled", "local-only", "best local-only", "fedavg", "fedprox", "fedadam")
FEDERATED_FAMILY = "federated"


class CompareError(ValueError):
    """A study folder cannot be compared; the message names the folder and the missing file."""


@dataclass(frozen=True)
class FinishedStudy:
    """What :func:`load_study_output` reads from one ``fedfusion experiment --out`` folder."""

    folder: Path
    name: str
    dataset: str
    metric: str
    label: str  # partition and its options, e.g. "dirichlet alpha=0.3, image missing (1 site + 20 %)"
    rows: list[dict[str, Any]]
    best_local_site: str | None

    def seeds(self, method: str) -> dict[int, float]:
        """{seed: mean over sites} of ``method``'s metric."""
        return per_seed_means(self.rows, method, self.metric)

    def summary(self, method: str) -> tuple[float, float]:
        """Mean and sd over seeds; NaN when the study lacks the method."""
        return mean_sd(list(self.seeds(method).values()))

    def methods(self, family: str | None = None) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows if family is None or r["family"] == family))


def load_study_output(folder: str | Path) -> FinishedStudy:
    """Read ``results.csv``, ``summary.json`` and ``study.json`` of a finished study."""
    folder = Path(folder)
    paths = {name: folder / name for name in ("results.csv", "summary.json", "study.json")}
    missing = [name for name, path in paths.items() if not path.is_file()]
    if missing:
        raise CompareError(f"{folder}: not a finished study (missing {', '.join(missing)}); "
                           "run `fedfusion experiment STUDY.toml --out DIR` to completion first")
    summary = json.loads(paths["summary.json"].read_text())
    study = json.loads(paths["study.json"].read_text())
    metric = summary["metric"]
    with paths["results.csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for line, row in enumerate(rows, start=2):
        if metric not in row or "seed" not in row:
            raise CompareError(f"{paths['results.csv']}, line {line}: expected columns 'seed' and '{metric}'")
        row[metric] = float(row[metric]) if row[metric] not in ("", "nan") else math.nan
    return FinishedStudy(folder=folder, name=summary["study"], dataset=summary["dataset"], metric=metric,
                         label=_partition_label(study), rows=rows, best_local_site=summary.get("best_local_site"))


def _partition_label(study: dict[str, Any]) -> str:
    options = dict(study.get("partition_options") or {})
    parts = [study["partition"]]
    if "alpha" in options:
        parts[0] += f" alpha={options.pop('alpha'):g}"
    modality = options.pop("missing_modality", None)
    if modality:
        sites, fraction = options.pop("missing_sites", 0), options.pop("missing_fraction", 0.0)
        parts.append(f"{modality} missing ({sites} site(s) + {fraction:.0%} of rows elsewhere)")
    return ", ".join(parts)


def _cell(mean: float, sd: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def _paired(study: FinishedStudy, a: str, b: str) -> tuple[float, float]:
    """Mean ± sd over seeds of (a - b), paired by seed."""
    left, right = study.seeds(a), study.seeds(b)
    return mean_sd([left[s] - right[s] for s in left if s in right])


def methods_table(studies: Sequence[FinishedStudy], methods: Sequence[str] = MAIN_METHODS) -> list[dict[str, Any]]:
    """One row per method (those any study has), one column per study: mean ± sd over seeds."""
    rows = []
    for method in methods:
        if not any(method in s.methods() for s in studies):
            continue
        row: dict[str, Any] = {"method": method}
        for s in studies:
            head = f"{s.name} {s.metric}"
            cell = _cell(*s.summary(method))
            if method == "best local-only" and s.best_local_site and cell != "n/a":
                cell += f" ({s.best_local_site})"
            row[head] = cell
        rows.append(row)
    return rows


def goal_table(studies: Sequence[FinishedStudy], margin: float = 0.02) -> list[dict[str, Any]]:
    """Per study and federated method: Δ to best local-only and to pooled (paired by seed: mean ± sd,
    then a t 95 % interval over seeds and the sign count) and whether federated >= best local-only
    and >= pooled - ``margin`` hold on the means. FLamby's best local-only is chosen on test scores
    (optimistic); a study that recorded validation scores also gets the fair, val-chosen one."""
    rows = []
    for s in studies:
        best_local, pooled = s.summary("best local-only")[0], s.summary("pooled")[0]
        fair = FAIR_BEST_LOCAL in s.methods()
        for method in s.methods(FEDERATED_FAMILY):
            mean = s.summary(method)[0]
            row = {
                "study": s.name, "method": method, s.metric: _cell(*s.summary(method)),
                "Δ vs best local-only": _cell(*_paired(s, method, "best local-only")),
                "95 % CI, seeds (optimistic best local)": _paired_ci(s, method, "best local-only"),
                ">= best local-only?": _verdict(mean, best_local, 0.0),
            }
            if fair:
                row["Δ vs fair best local-only [95 % CI], seeds"] = _paired_ci(s, method, FAIR_BEST_LOCAL)
                row[">= fair best local-only?"] = _verdict(mean, s.summary(FAIR_BEST_LOCAL)[0], 0.0)
            row["Δ vs pooled"] = _cell(*_paired(s, method, "pooled"))
            row["95 % CI, seeds (pooled)"] = _paired_ci(s, method, "pooled")
            row[f">= pooled - {margin:g}?"] = _verdict(mean, pooled, margin)
            rows.append(row)
    return rows


def _paired_ci(study: FinishedStudy, a: str, b: str) -> str:
    """``+0.012 [-0.004, +0.028], better in 4/5 seeds`` (the study report's paired-difference cell)."""
    diff = paired_difference(study.seeds(a), study.seeds(b))
    return "n/a" if math.isnan(diff["mean"]) else f"{paired_cell(diff)}, {sign_text(diff)}"


def _verdict(mean: float, reference: float, margin: float) -> str:
    if math.isnan(mean) or math.isnan(reference):
        return "n/a"
    return "yes" if mean >= reference - margin else "no"


def fusion_table(studies: Sequence[FinishedStudy]) -> list[dict[str, Any]]:
    """One row per study: for each base method with unimodal arms, fusion and its best single modality."""
    rows = []
    for s in studies:
        row: dict[str, Any] = {"study": s.label}
        unimodal = [r for r in s.rows if r["family"] == "unimodal"]
        for base in dict.fromkeys(r.get("base_method", "") for r in unimodal):
            arms = list(dict.fromkeys(r["method"] for r in unimodal if r.get("base_method") == base))
            scored = [(s.summary(a)[0], a) for a in arms if not math.isnan(s.summary(a)[0])]
            if not scored or base not in s.methods():
                continue
            best = max(scored)[1]
            row[f"{base} fusion"] = _cell(*s.summary(base))
            row[f"{base} best unimodal"] = f"{_cell(*s.summary(best))} ({best[len(base):].strip(' []')})"
            row[f"{base} Δ"] = _cell(*_paired(s, base, best))
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedfusion.simulations.study_compare",
                                     description="Markdown tables across finished `fedfusion experiment` folders.")
    parser.add_argument("folders", nargs="+", type=Path, help="study output folders (--out of fedfusion experiment)")
    parser.add_argument("--margin", type=float, default=0.02, help="goal: federated >= pooled - MARGIN")
    args = parser.parse_args(argv)
    try:
        studies = [load_study_output(f) for f in args.folders]
    except CompareError as err:
        parser.exit(2, f"error: {err}\n")
    print("## Methods (mean over sites per seed, then mean ± sd over seeds)\n")
    print(markdown_table(methods_table(studies)) + "\n")
    goal = goal_table(studies, args.margin)
    if goal:
        print("## Goal: federated >= best local-only and >= pooled - margin\n")
        print(markdown_table(goal) + "\n")
    fusion = [r for r in fusion_table(studies) if len(r) > 1]
    if fusion:
        print("## Fusion vs best single modality\n")
        print(markdown_table(fusion) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
