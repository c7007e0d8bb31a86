"""Utility under sample-level DP: the federated model's test metric at ε ∈ {1, 3, 8, ∞} (δ = 1e-5).

For each data set (``ovarian``: 4 real studies as sites, survival, C-index; ``wdbc-multimodal``:
3 simulated IID sites, rendered nucleus image + morphometry table, AUC) and each seed, the sites
are built once and the same federation runs without DP (ε = ∞) and with DP-SGD at every site
(``dp-mode = "sample"``, each site calibrating its noise so the run's rounds end at ``target-epsilon``).
Prints mean ± sd over seeds of the site-weighted test metric of the final global model, and the
largest ε any site reported (it must not pass the target).

    python benchmarks/dp_utility.py --seeds 3 --out docs/results/dp_utility.json

The survival rows carry the caveat in ``common/privacy.py``: the Cox partial likelihood couples the
cases of a batch, so per-sample ε there is the DP-SGD accounting, not a proven bound.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfusion.common.config import load_schema
from fedfusion.common.training import primary_metric
from fedfusion.simulations.simulate import SimulationSpec, prepare_sites, run_config_for, run_simulated_federation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)

CASES = (("ovarian", "natural", 4), ("wdbc-multimodal", "iid", 3))
EPSILONS = (1.0, 3.0, 8.0, math.inf)


def run(
    seeds: int,
    rounds: int,
    local_epochs: int,
    batch_size: int,
    lr: float,
    cases: tuple = CASES,
    epsilons: tuple[float, ...] = EPSILONS,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, partition, num_sites in cases:
            for seed in range(seeds):
                spec = SimulationSpec(
                    dataset=dataset,
                    out_dir=Path(tmp) / f"{dataset}-{seed}",
                    partition=partition,
                    num_sites=num_sites,
                    rounds=rounds,
                    local_epochs=local_epochs,
                    batch_size=batch_size,
                    lr=lr,
                    seed=seed,
                    baselines=False,
                )
                schema_path, sites = prepare_sites(spec)
                metric = primary_metric(load_schema(schema_path))
                for epsilon in epsilons:
                    config = run_config_for(spec, schema_path, sites)
                    config["run-dir"] = str(spec.out_dir / f"eps-{epsilon}")
                    if math.isfinite(epsilon):
                        config.update(
                            {
                                "dp-mode": "sample",
                                "target-epsilon": epsilon,
                                "target-delta": 1e-5,
                                "dp-max-grad-norm": 1.0,
                                "study": f"utility-{dataset}-{seed}-{epsilon}",
                            }
                        )
                    began = time.perf_counter()
                    result = run_simulated_federation(config, len(sites))
                    spent = [float(m["epsilon"]) for m in result.site_metrics if "epsilon" in m]
                    row = {
                        "dataset": dataset,
                        "metric": metric,
                        "seed": seed,
                        "epsilon": epsilon,
                        "score": float(result.rounds[-1].get(f"eval_{metric}", math.nan)),
                        "max_site_epsilon": max(spent) if spent else None,
                        "refusals": len(result.refusals),
                        "seconds": time.perf_counter() - began,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for epsilon in dict.fromkeys(r["epsilon"] for r in rows):
            scores = [r["score"] for r in rows if r["dataset"] == dataset and r["epsilon"] == epsilon]
            spent = [
                r["max_site_epsilon"]
                for r in rows
                if r["dataset"] == dataset and r["epsilon"] == epsilon and r["max_site_epsilon"] is not None
            ]
            metric = next(r["metric"] for r in rows if r["dataset"] == dataset)
            table.append(
                {
                    "dataset": dataset,
                    "metric": metric,
                    "epsilon": epsilon,
                    "mean": statistics.fmean(scores),
                    "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                    "seeds": len(scores),
                    "max_site_epsilon": max(spent) if spent else None,
                }
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--datasets", default=",".join(c[0] for c in CASES))
    parser.add_argument("--json", "--out", dest="out", metavar="PATH", default=None,
                        help="also write the rows and their provenance here")
    args = parser.parse_args()
    started = provenance()
    cases = tuple(c for c in CASES if c[0] in args.datasets.split(","))
    rows = run(args.seeds, args.rounds, args.local_epochs, args.batch_size, args.lr, cases)
    table = summarise(rows)
    print(f"\n| data set | metric | ε (δ = 1e-5) | mean ± sd ({args.seeds} seeds) | largest site ε |")
    print("|---|---|---|---|---|")
    for t in table:
        spent = "-" if t["max_site_epsilon"] is None else f"{t['max_site_epsilon']:.2f}"
        print(f"| {t['dataset']} | {t['metric']} | {t['epsilon']:g} | {t['mean']:.3f} ± {t['sd']:.3f} | {spent} |")
    if args.out:
        print(f"wrote {write_json(args.out, {'settings': vars(args), 'rows': rows, 'table': table}, started)}")


if __name__ == "__main__":
    main()
