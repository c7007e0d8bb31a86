"""Federated (FedAvg in Flower's simulation runtime) vs pooled vs local-only on a natural split, over seeds.

Each seed runs the full `fedfusion simulate` study (same code path as the CLI): sites from the data
set's real site column, a FedAvg federation, a pooled model and one local-only model per site, all
scored on every site's own test split. Prints mean ± sd over seeds of the mean-over-sites metric per
method, and the gap the Federation issue asks about: FedAvg − pooled (goal: ≥ −0.03).

    python benchmarks/federated_vs_pooled.py --dataset ovarian --seeds 5 --rounds 10 \
        --out docs/results/federated_vs_pooled.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedfusion.simulations.simulate import SimulationSpec, simulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ovarian")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--json", "--out", dest="out", metavar="PATH", default=None,
                        help="also write the results and their provenance here")
    args = parser.parse_args()
    started = provenance()
    logging.basicConfig(level=logging.WARNING)
    per_seed: list[dict[str, float]] = []
    per_site: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            began = time.perf_counter()
            spec = SimulationSpec(dataset=args.dataset, out_dir=Path(tmp) / f"seed-{seed}", rounds=args.rounds,
                                  local_epochs=args.local_epochs, strategy=args.strategy, seed=seed)
            report = simulate(spec)
            summary = json.loads((report.parent / "summary.json").read_text())
            means = summary["mean_over_sites"]
            per_seed.append(means)
            comparison = (report.parent / "comparison.csv").read_text().splitlines()
            per_site.append({"seed": seed, "comparison_csv": comparison})
            print(f"seed {seed}: " + ", ".join(f"{m} {v:.3f}" for m, v in means.items())
                  + f"  ({time.perf_counter() - began:.0f} s)", flush=True)
    metric = summary["metric"]
    methods = list(per_seed[0])
    print(f"\n{args.dataset}, natural split, {args.seeds} seeds, {args.rounds} rounds × {args.local_epochs} "
          f"local epochs: mean over sites of the test {metric}, mean ± sd over seeds")
    result: dict[str, object] = {"dataset": args.dataset, "metric": metric, "seeds": args.seeds,
                                 "rounds": args.rounds, "local_epochs": args.local_epochs, "methods": {}}
    for method in methods:
        values = np.array([s[method] for s in per_seed], dtype=float)
        result["methods"][method] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)),  # type: ignore[index]
                                     "values": values.tolist()}
        print(f"  {method:28s} {values.mean():.3f} ± {values.std(ddof=1):.3f}")
    federated = next(m for m in methods if m.startswith("federated"))
    gaps = np.array([s[federated] - s["pooled"] for s in per_seed])
    result["federated_minus_pooled"] = {"mean": float(gaps.mean()), "sd": float(gaps.std(ddof=1)),
                                        "values": gaps.tolist()}
    result["per_seed"] = per_site
    print(f"  {federated} − pooled: {gaps.mean():+.3f} ± {gaps.std(ddof=1):.3f} (goal ≥ −0.03)")
    if args.out:
        print(f"wrote {write_json(args.out, result, started)}")


if __name__ == "__main__":
    main()
