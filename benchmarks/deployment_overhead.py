"""Deployment round overhead on loopback: real SuperLink + 3 SuperNodes, ovarian natural sites.

Prints, per round, the train phase's wall time, the slowest site's local training time and their
difference (what federation costs on top of the work), plus the ratio overhead / training, for
fedfusion's warm site executor and (with ``--compare-default``) Flower's default process-per-message
isolation, measured in the same run.

    python benchmarks/deployment_overhead.py --rounds 3 --compare-default
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


def measure(folder: Path, schema: Path, manifests: dict[str, Path], rounds: int, local_epochs: int,
            warm: bool) -> float:
    """Run one loopback federation; print its per-round table; return the mean round overhead (s)."""
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
    return overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--compare-default", action="store_true",
                        help="also measure Flower's default isolation (a new process per message)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        schema = build_dataset("ovarian", folder / "data")
        manifests = partition_manifest(folder / "data" / "manifest.csv", load_schema(schema), "natural")
        sites = {s: manifests[s] for s in SITES}
        warm = measure(folder / "warm", schema, sites, args.rounds, args.local_epochs, warm=True)
        if args.compare_default:
            cold = measure(folder / "default", schema, sites, args.rounds, args.local_epochs, warm=False)
            print(f"\ndefault overhead / warm overhead = {cold / warm:.1f}x")


if __name__ == "__main__":
    main()
