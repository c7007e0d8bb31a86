"""Which model-selection rule delivers the best test score, replayed offline on finished runs.

Question (issue #18): on natural splits the sites' validation splits hold 5-41 rows, and the default
``best-val`` (best site-weighted validation C-index/AUC) often delivers round 1 while the test score
keeps moving. Every run already logs each round's validation columns (``metrics.csv``: ``eval_val_*``,
site-weighted by validation size) and each site's test metrics (``site_metrics.csv``), whatever rule the
run itself used. So each rule can be replayed on the same runs with the server's own
:func:`fedfusion.server.model_selection.choose_round`; every rule sees the same trained models, which is
fairer and ten times cheaper than one run per rule. The test split is only read to SCORE a choice.

Reported per study and rule: per seed the unweighted mean over sites of the test metric at the chosen
round (FLamby's convention, as in docs/benchmarks.md), then mean ± sd over seeds, and the rounds chosen.
``oracle`` (best test round, chosen on test) is the upper bound, never a rule.

    for s in 0 1 2 3 4; do
      fedfusion simulate --dataset ovarian --rounds 10 --no-baselines --seed $s --out runs/ms/ovarian-s$s
    done
    python benchmarks/model_selection.py runs/ms/* --out docs/results/model_selection.json

A RUN argument is a ``fedfusion simulate --out`` folder (its ``federated/`` is read) or a run folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedfusion.server.model_selection import SelectionRule, choose_round

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)

#: (name, kind, min_round, window); min_round 0 = auto (max(2, N // 3)).
RULES: tuple[tuple[str, str, int, int], ...] = (
    ("last", "last", 1, 1),
    ("best-val", "best-val", 1, 1),
    ("best-val min=auto", "best-val", 0, 1),
    ("best-val window=3", "best-val", 1, 3),
    ("best-val min=auto window=3", "best-val", 0, 3),
    ("best-val-loss", "best-val-loss", 1, 1),
    ("best-val-loss min=auto", "best-val-loss", 0, 1),
    ("best-val-loss window=3", "best-val-loss", 1, 3),
    ("best-val-loss min=auto window=3", "best-val-loss", 0, 3),
)
METRICS = ("c_index", "auc")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def run_folder(path: Path) -> Path:
    """The folder holding ``metrics.csv``: ``path`` itself or its ``federated/``."""
    for candidate in (path, path / "federated"):
        if (candidate / "metrics.csv").is_file() and (candidate / "site_metrics.csv").is_file():
            return candidate
    raise SystemExit(f"{path}: expected metrics.csv and site_metrics.csv in it or in its federated/ folder")


def load_run(path: Path) -> dict[str, Any]:
    """One run: its study (schema name), seed, rounds, metric and per-round mean site test metric."""
    folder = run_folder(path)
    config = json.loads((folder / "run_config.json").read_text()) if (folder / "run_config.json").is_file() else {}
    rows = _read_csv(folder / "metrics.csv")
    metric = next((m for m in METRICS if rows and f"eval_val_{m}" in rows[0]), None)
    if metric is None:
        raise SystemExit(f"{folder}/metrics.csv: no eval_val_c_index or eval_val_auc column (sites without val rows?)")
    per_round: dict[int, list[float]] = defaultdict(list)
    for row in _read_csv(folder / "site_metrics.csv"):
        value = row.get(metric, "")
        if row["phase"] == "evaluate" and value not in ("", "nan"):
            per_round[int(row["round"])].append(float(value))
    schema_path = Path(str(config.get("schema", "")))
    study = json.loads(schema_path.read_text()).get("name", "") if schema_path.is_file() else ""
    return {"path": str(path), "study": study or str(config.get("study") or "unnamed"),
            "seed": int(config.get("seed", 0)),
            "num_rounds": int(config.get("num-server-rounds", max(int(r["round"]) for r in rows))),
            "metric": metric, "rows": rows,
            "test": {r: sum(v) / len(v) for r, v in per_round.items() if v}}


#: The paired comparison: every rule's per-seed difference to this one (the default before issue #18).
REFERENCE = "best-val"


def replay(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per study and rule: test metric of the chosen round per seed, mean ± sd, rounds chosen, and the
    per-seed difference to :data:`REFERENCE` (paired: same runs, so the seed-to-seed spread cancels)."""
    out = []
    for study in sorted({r["study"] for r in runs}):
        mine = sorted((r for r in runs if r["study"] == study), key=lambda r: r["seed"])
        for name, kind, min_round, window in (*RULES, ("oracle (chosen on test)", "", 0, 0)):
            chosen, scores = [], []
            for run in mine:
                if kind:
                    rule = SelectionRule(kind, run["metric"], min_round, window)
                    picked = choose_round(run["rows"], rule, run["num_rounds"])
                else:
                    picked = max((r for r in run["test"] if r >= 1), key=lambda r: run["test"][r])
                picked = picked if picked is not None else max(run["test"])
                chosen.append(picked)
                scores.append(run["test"][picked])
            out.append({"study": study, "rule": name, "metric": mine[0]["metric"],
                        "mean": statistics.fmean(scores), "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                        "per_seed": scores, "seeds": [r["seed"] for r in mine], "rounds_chosen": chosen})
        reference = next(r["per_seed"] for r in out if r["study"] == study and r["rule"] == REFERENCE)
        for result in (r for r in out if r["study"] == study):
            delta = [a - b for a, b in zip(result["per_seed"], reference, strict=True)]
            result["delta_vs_reference"] = statistics.fmean(delta)
            result["delta_sd"] = statistics.stdev(delta) if len(delta) > 1 else 0.0
            result["seeds_better_worse"] = [sum(d > 1e-12 for d in delta), sum(d < -1e-12 for d in delta)]
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"| study | rule | test metric, mean ± sd over seeds | Δ vs {REFERENCE} (paired) | seeds +/- | "
             "rounds chosen (seeds in order) |", "|---|---|---|---|---|---|"]
    for r in results:
        better, worse = r["seeds_better_worse"]
        lines.append(f"| {r['study']} | {r['rule']} | {r['metric']} {r['mean']:.3f} ± {r['sd']:.3f} | "
                     f"{r['delta_vs_reference']:+.3f} ± {r['delta_sd']:.3f} | {better}/{worse} | "
                     f"{', '.join(map(str, r['rounds_chosen']))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="fedfusion simulate --out folders or run folders")
    parser.add_argument("--json", "--out", dest="out", metavar="PATH", type=Path, default=None,
                        help="write the results and their provenance as JSON here")
    args = parser.parse_args(argv)
    started = provenance()
    results = replay([load_run(p) for p in args.runs])
    print(table(results))
    if args.out is not None:
        write_json(args.out, {"runs": [str(p) for p in args.runs], "results": results}, started)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
