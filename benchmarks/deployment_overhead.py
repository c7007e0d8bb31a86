"""Deployment round overhead on loopback: real SuperLink + 3 SuperNodes, ovarian natural sites.

Prints, per round, the train phase's wall time, the slowest site's local training time and their
difference (what federation costs on top of the work), plus the ratio overhead / training, for
fedfusion's warm site executor and (with ``--compare-default``) Flower's default process-per-message
isolation, measured in the same run.

    python benchmarks/deployment_overhead.py --rounds 3 --compare-default
    python benchmarks/deployment_overhead.py --rounds 3 --json docs/results/deployment_overhead.json  # + raw rows
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedfusion.common.config import load_schema
from fedfusion.simulations.datasets import build_dataset
from fedfusion.simulations.loopback import LoopbackDeployment
from fedfusion.simulations.partition import partition_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)

SITES = ("study-16", "study-13", "study-4")


def measure(folder: Path, schema: Path, manifests: dict[str, Path], rounds: int, local_epochs: int,
            warm: bool) -> dict[str, Any]:
    """Run one loopback federation; print its per-round table; return its rows and means (seconds)."""
    label = "warm site executor" if warm else "Flower default isolation"
    with LoopbackDeployment(folder / "deploy", schema, manifests, warm=warm) as deployment:
        time.sleep(3)
        began = time.monotonic()
        done = deployment.run(folder / "run", rounds, {"local-epochs": local_epochs})
        total = time.monotonic() - began
        if done.returncode != 0:
            raise SystemExit(f"run failed:\n{done.stderr[-3000:]}\n{deployment.logs()}")
    rows = [r for r in csv.DictReader((folder / "run" / "metrics.csv").open()) if r["round"] != "0"]
    print(f"\n{label}")
    print(f"{'round':>5} {'train phase s':>14} {'slowest site s':>15} {'overhead s':>11}")
    for r in rows:
        print(f"{r['round']:>5} {float(r['train_phase_seconds']):14.2f} {float(r['slowest_site_train_seconds']):15.2f}"
              f" {float(r['round_overhead_seconds']):11.2f}")
    overhead = sum(float(r["round_overhead_seconds"]) for r in rows) / len(rows)
    work = sum(float(r["slowest_site_train_seconds"]) for r in rows) / len(rows)
    print(f"mean round overhead {overhead:.2f} s; overhead / slowest-site training = {overhead / work:.1f}x; "
          f"whole run {total:.1f} s for {rounds} rounds (incl. round-0 evaluation)")
    keys = ("train_phase_seconds", "slowest_site_train_seconds", "round_overhead_seconds")
    return {"mode": "warm" if warm else "flower-default", "mean_round_overhead_seconds": overhead,
            "mean_slowest_site_train_seconds": work, "whole_run_seconds": total,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "rounds": [{"round": int(r["round"]), **{k: float(r[k]) for k in keys}} for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--compare-default", action="store_true",
                        help="also measure Flower's default isolation (a new process per message)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and their provenance here")
    args = parser.parse_args()
    started = provenance()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        schema = build_dataset("ovarian", folder / "data")
        manifests = partition_manifest(folder / "data" / "manifest.csv", load_schema(schema), "natural")
        sites = {s: manifests[s] for s in SITES}
        runs = [measure(folder / "warm", schema, sites, args.rounds, args.local_epochs, warm=True)]
        if args.compare_default:
            runs.append(measure(folder / "default", schema, sites, args.rounds, args.local_epochs, warm=False))
            ratio = runs[1]["mean_round_overhead_seconds"] / runs[0]["mean_round_overhead_seconds"]
            print(f"\ndefault overhead / warm overhead = {ratio:.1f}x")
    if args.json:
        settings = {"rounds": args.rounds, "local_epochs": args.local_epochs, "sites": list(SITES),
                    "transport": "TLS + SuperNode authentication, loopback"}
        print(f"wrote {write_json(args.json, {'settings': settings, 'runs': runs}, started)}")


if __name__ == "__main__":
    main()
