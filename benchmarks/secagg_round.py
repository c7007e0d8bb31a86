"""Secure round time / plain round time in Flower's simulation runtime, measured in one run.

For each number of sites, the same data set, partition, model and seeds run in Flower's simulation
runtime (Ray, real ServerApp and ClientApp) as plain modality-aware FedAvg and as secure aggregation
(four message exchanges, stage 1 trains), alternated ``--repeat`` times. Printed per setting: the
median train-phase wall time of rounds 1..N (sampling to new global model, evaluation excluded),
the secure/plain ratio of the medians and of the fastest rounds, the part of the secure round after
training (stages 2-4 plus unmasking), and the largest difference between the two final global
models (quantisation leaves ~1e-7 per round; later rounds' local Adam steps can amplify that to the
order of the learning rate, in plain runs alike).

    python benchmarks/secagg_round.py                     # wdbc-multimodal, iid, 3 and 10 sites
    python benchmarks/secagg_round.py --sites 3 10 --rounds 3 --dataset ovarian
    python benchmarks/secagg_round.py --json docs/results/secagg_round.json   # + raw rows, provenance
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedfusion.simulations.simulate import SimulationSpec, prepare_sites, run_config_for, run_simulated_federation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)

SECURE = {"secure-aggregation": True, "secagg-clip": 1.0, "secagg-bits": 32, "secagg-weight-bound": 10_000.0}


def _round_values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r["round"] > 0 and key in r]


def measure(dataset: str, sites: int, rounds: int, epochs: int, repeat: int, folder: Path) -> dict[str, float]:
    """Plain and secure runs, alternated ``repeat`` times; medians over every round of every repeat
    (a shared machine's load spikes hit single rounds, the median ignores them)."""
    spec = SimulationSpec(dataset=dataset, out_dir=folder, partition="iid", num_sites=sites, rounds=rounds,
                          local_epochs=epochs, baselines=False, device="cpu")
    schema_path, manifests = prepare_sites(spec)
    base = run_config_for(spec, schema_path, manifests)
    times: dict[str, list[float]] = {"plain": [], "secure": [], "protocol": []}
    results: dict[str, Any] = {}
    for rep in range(repeat):
        for label, extra in (("plain", {}), ("secure", SECURE)):
            result = run_simulated_federation({**base, **extra, "run-dir": str(folder / f"{label}-{rep}")}, sites)
            times[label] += _round_values(result.rounds, "train_phase_seconds")
            times["protocol"] += _round_values(result.rounds, "secagg_protocol_seconds")
            results[label] = result
    a = {k: np.asarray(v.numpy()) for k, v in results["plain"].arrays.items()}
    b = {k: np.asarray(v.numpy()) for k, v in results["secure"].arrays.items()}
    diff = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a if np.issubdtype(a[k].dtype, np.floating))
    return {"plain": float(np.median(times["plain"])), "secure": float(np.median(times["secure"])),
            "plain_min": min(times["plain"]), "secure_min": min(times["secure"]),
            "protocol": float(np.median(times["protocol"])), "diff": diff,
            "params": float(sum(v.size for v in a.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="wdbc-multimodal")
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2, help="plain/secure run pairs per setting")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and their provenance here")
    args = parser.parse_args()
    started = provenance()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for sites in args.sites:
            results[sites] = measure(args.dataset, sites, args.rounds, args.local_epochs, args.repeat,
                                     Path(tmp) / f"s{sites}")
    print(f"\n{args.dataset}, iid sites, {args.repeat} x {args.rounds} rounds of {args.local_epochs} local epoch(s); "
          "median train-phase seconds per round (Flower simulation runtime)")
    print(f"{'sites':>5} {'params':>9} {'plain s':>8} {'secure s':>9} {'secure/plain':>12} {'min ratio':>9} "
          f"{'stages 2-4 s':>12} {'max |diff|':>10}")
    for sites, r in results.items():
        ratio, fastest = r["secure"] / r["plain"], r["secure_min"] / r["plain_min"]
        print(f"{sites:>5} {r['params']:>9.0f} {r['plain']:>8.2f} {r['secure']:>9.2f} {ratio:>12.2f} {fastest:>9.2f} "
              f"{r['protocol']:>12.2f} {r['diff']:>10.2e}")
    print("min ratio: fastest secure round / fastest plain round (least disturbed by other load on the machine)")
    if args.json:
        settings = {"dataset": args.dataset, "partition": "iid", "rounds": args.rounds,
                    "local_epochs": args.local_epochs, "repeat": args.repeat,
                    "times": "median train-phase seconds per round"}
        rows = [{"sites": sites, **r, "secure_over_plain": r["secure"] / r["plain"],
                 "min_ratio": r["secure_min"] / r["plain_min"]} for sites, r in results.items()]
        print(f"wrote {write_json(args.json, {'settings': settings, 'rows': rows}, started)}")

if __name__ == "__main__":
    main()
