"""Longitudinal visits vs the last visit alone, on real time-dependent survival data (landmark design).

Question (issue #8): does a temporal encoder over a patient's visit history predict survival better
than a model that sees only the most recent visit? The honest comparison needs a LANDMARK design (see
``fedfusion.simulations.datasets``): every patient is still at risk at the landmark L, every model
sees only visits at or before L, and all predict survival after L. Otherwise the number and span of
visits would leak the follow-up length and with it the outcome.

Arms, all on the same patients, the same seeded split and the same training loop (pooled training,
early stopping on val, test C-index):

- ``temporal-gru`` / ``temporal-transformer``: the last 8 visits up to L through the time-aware GRU
  or transformer (``visits`` modality) + the baseline clinical table, attention fusion;
- ``last-visit``: the same schema with ``max_visits = 1``: the same features and encoder (GRU, one
  step: values, missing flags and the visit's time), only the most recent visit at or before L;
- ``clinical-only``: no visits at all (what the visits add over the baseline covariates).

The per-seed difference temporal - last-visit is measured within one run (same split, same seed).
``--federate`` also runs the simulated federation (``simulate()``, Flower simulation runtime) on a
Dirichlet split of the data set (no real site column exists) and records the C-index after it.

    python benchmarks/longitudinal.py --seeds 5 --out docs/results/longitudinal.json --federate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedfusion.common.config import ModelConfig, TrainConfig, load_schema
from fedfusion.simulations.datasets import build_dataset
from fedfusion.simulations.local_training import load_for_training, run_local_training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)

ARMS = ("temporal-gru", "temporal-transformer", "last-visit", "clinical-only")


def _arm_manifest(path: Path, arm: str, seed: int) -> Any:
    schema = load_schema(path.parent / "schema.json")
    assert schema.visits is not None
    if arm == "last-visit":
        schema = dataclasses.replace(schema, visits=dataclasses.replace(schema.visits, max_visits=1))
    manifest = load_for_training(path, schema, seed, resplit=True)
    if arm == "clinical-only":  # parsed as long format, then the visits modality is left out
        manifest = dataclasses.replace(manifest, schema=schema.with_modalities(["clinical"]))
    return manifest


def run(datasets: list[str], seeds: int, epochs: int, batch_size: int, arms: tuple[str, ...]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in datasets:
            path = build_dataset(dataset, Path(tmp) / dataset, seed=0).parent / "manifest.csv"
            scores: dict[str, list[float]] = {arm: [] for arm in arms}
            seconds: dict[str, float] = {arm: 0.0 for arm in arms}
            for seed in range(seeds):
                for arm in arms:
                    began = time.perf_counter()
                    manifest = _arm_manifest(path, arm, seed)
                    encoder = "transformer" if arm == "temporal-transformer" else "gru"
                    result = run_local_training(manifest, ModelConfig(fusion="attention", temporal_encoder=encoder),
                                                TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed,
                                                            patience=8))
                    scores[arm].append(float(result.test["c_index"]))
                    seconds[arm] += time.perf_counter() - began
                print(f"{dataset} seed {seed}: " + "  ".join(f"{a} {scores[a][-1]:.3f}" for a in arms), flush=True)
            summary = {arm: {"mean": float(np.mean(s)), "sd": float(np.std(s, ddof=1)) if len(s) > 1 else 0.0,
                             "scores": s, "seconds_per_seed": seconds[arm] / seeds} for arm, s in scores.items()}
            diffs = {}
            for arm in ("temporal-gru", "temporal-transformer"):
                if arm in scores and "last-visit" in scores:
                    d = np.subtract(scores[arm], scores["last-visit"])
                    diffs[f"{arm} - last-visit"] = {"per_seed": d.tolist(), "mean": float(d.mean()),
                                                    "sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                                                    "seeds_better": int((d > 0).sum())}
            rows.append({"dataset": dataset, "metric": "c_index", "seeds": seeds, "epochs": epochs,
                         "arms": summary, "differences": diffs})
            for arm, s in summary.items():
                print(f"{dataset:10s} {arm:22s} C-index {s['mean']:.3f} ± {s['sd']:.3f} "
                      f"({s['seconds_per_seed']:.1f} s/seed)", flush=True)
            for name, d in diffs.items():
                print(f"{dataset:10s} {name:34s} {d['mean']:+.3f} ± {d['sd']:.3f} per seed "
                      f"(better in {d['seeds_better']}/{seeds} seeds)", flush=True)
    return rows


def federate(dataset: str, rounds: int, num_sites: int, alpha: float, seed: int) -> dict[str, Any]:
    """The existing simulation path (Flower simulation runtime) on a Dirichlet (event-skew) split."""
    from fedfusion.simulations.simulate import SimulationSpec, simulate

    with tempfile.TemporaryDirectory() as tmp:
        spec = SimulationSpec(dataset=dataset, out_dir=Path(tmp), partition="dirichlet", num_sites=num_sites,
                              rounds=rounds, local_epochs=2, batch_size=32, seed=seed, baselines=True,
                              baseline_epochs=30, partition_options={"alpha": alpha})
        began = time.perf_counter()
        report = simulate(spec)
        summary = json.loads((report.parent / "summary.json").read_text())
        partition = json.loads((Path(tmp) / "data" / "partition.json").read_text())
    out = {"dataset": dataset, "partition": f"dirichlet (alpha {alpha}, skew on event)", "num_sites": num_sites,
           "rounds": rounds, "local_epochs": 2, "seed": seed, "seconds": time.perf_counter() - began,
           "mean_over_sites": summary["mean_over_sites"],
           "site_events": {s: v.get("events") for s, v in partition["sites"].items()}}
    print(f"federated {dataset}: " + ", ".join(f"{k} {v:.3f}" for k, v in out["mean_over_sites"].items()),
          flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="heartvalve,csl")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64, help="Cox needs events in each batch: not too small")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--federate", action="store_true", help="also run the simulated federation (first data set)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", "--out", dest="out", metavar="PATH", default=None,
                        help="also write the results and their provenance here")
    args = parser.parse_args()
    started = provenance()
    began = time.perf_counter()
    rows = run(args.datasets.split(","), args.seeds, args.epochs, args.batch_size, tuple(args.arms.split(",")))
    record: dict[str, Any] = {"benchmark": "longitudinal", "results": rows}  # load and cores: in "provenance"
    if args.federate:
        record["federated"] = [federate(d, args.rounds, 3, 1.0, 0) for d in args.datasets.split(",")]
    record["seconds"] = time.perf_counter() - began
    if args.out:
        print(f"wrote {write_json(args.out, record, started)}")


if __name__ == "__main__":
    main()
