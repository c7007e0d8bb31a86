"""Deployment round overhead on loopback: real SuperLink + 3 SuperNodes, ovarian natural sites.

Prints, per round, the train phase's wall time, the slowest site's local training time and their
difference (what federation costs on top of the work), plus the ratio overhead / training.

    python benchmarks/deployment_overhead.py --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from fedfusion.common.config import load_schema
from fedfusion.simulations.datasets import build_dataset
from fedfusion.simulations.loopback import LoopbackDeployment
from fedfusion.simulations.partition import partition_manifest

SITES = ("study-16", "study-13", "study-4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        schema = build_dataset("ovarian", folder / "data")
        manifests = partition_manifest(folder / "data" / "manifest.csv", load_schema(schema), "natural")
        with LoopbackDeployment(folder / "deploy", schema, {s: manifests[s] for s in SITES}) as deployment:
            time.sleep(3)
            began = time.monotonic()
            done = deployment.run(folder / "run", args.rounds, {"local-epochs": args.local_epochs})
            total = time.monotonic() - began
            if done.returncode != 0:
                raise SystemExit(f"run failed:\n{done.stderr[-3000:]}\n{deployment.logs()}")
        rows = [r for r in csv.DictReader((folder / "run" / "metrics.csv").open()) if r["round"] != "0"]
    print(f"{'round':>5} {'train phase s':>14} {'slowest site s':>15} {'overhead s':>11}")
    for r in rows:
        print(f"{r['round']:>5} {float(r['train_phase_seconds']):14.2f} {float(r['slowest_site_train_seconds']):15.2f}"
              f" {float(r['round_overhead_seconds']):11.2f}")
    overhead = sum(float(r["round_overhead_seconds"]) for r in rows) / len(rows)
    work = sum(float(r["slowest_site_train_seconds"]) for r in rows) / len(rows)
    print(f"mean round overhead {overhead:.2f} s; overhead / slowest-site training = {overhead / work:.1f}x; "
          f"whole run {total:.1f} s for {args.rounds} rounds")


if __name__ == "__main__":
    main()
