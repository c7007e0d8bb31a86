"""Pooled training on shipped real data over several seeds (fresh 20 % hold-out per seed).

Prints mean ± sd of the test metric for each (data set, modalities, fusion) and the ratios the
Foundation issue asks about: fusion / best single modality on wdbc-multimodal.

    python benchmarks/pooled_baselines.py --seeds 5 --out docs/results/pooled.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedfusion.common.config import ModelConfig, TrainConfig, load_schema
from fedfusion.simulations.datasets import build_dataset
from fedfusion.simulations.local_training import load_for_training, run_local_training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)

CASES = [
    ("wdbc-multimodal", None, "attention"),
    ("wdbc-multimodal", None, "concat"),
    ("wdbc-multimodal", ("image",), "attention"),
    ("wdbc-multimodal", ("clinical",), "attention"),
    ("ovarian", None, "attention"),
    ("ovarian", ("omics",), "attention"),
]


def run(seeds: int, epochs: int, batch_size: int, cases: list[tuple[str, tuple[str, ...] | None, str]]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built: dict[str, Path] = {}
        for dataset, modalities, fusion in cases:
            if dataset not in built:
                built[dataset] = build_dataset(dataset, Path(tmp) / dataset, seed=0)
            schema = load_schema(built[dataset])
            scores, began = [], time.perf_counter()
            for seed in range(seeds):
                manifest = load_for_training(built[dataset].parent / "manifest.csv", schema, seed, modalities,
                                             resplit=True)
                result = run_local_training(manifest, ModelConfig(fusion=fusion),
                                            TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, patience=8))
                metric = "auc" if schema.has_classification else "c_index"
                scores.append(result.test[metric])
            row = {"dataset": dataset, "modalities": "+".join(modalities or schema.modalities), "fusion": fusion,
                   "metric": metric, "mean": float(np.mean(scores)), "sd": float(np.std(scores, ddof=1)),
                   "scores": scores, "seconds_per_seed": (time.perf_counter() - began) / seeds}
            print(f"{dataset:16s} {row['modalities']:16s} {fusion:10s} {metric} "
                  f"{row['mean']:.3f} ± {row['sd']:.3f}  ({row['seconds_per_seed']:.1f} s/seed)", flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64, help="Cox needs events in each batch: not too small")
    parser.add_argument("--only", default=None, help="run only cases of this data set")
    parser.add_argument("--json", "--out", dest="out", metavar="PATH", default=None,
                        help="also write the rows and their provenance here")
    args = parser.parse_args()
    started = provenance()
    cases = [c for c in CASES if args.only is None or c[0] == args.only]
    rows = run(args.seeds, args.epochs, args.batch_size, cases)
    by_key = {(r["dataset"], r["modalities"], r["fusion"]): r["mean"] for r in rows}
    fusion = by_key.get(("wdbc-multimodal", "image+clinical", "attention"))
    single = [by_key.get(("wdbc-multimodal", m, "attention")) for m in ("image", "clinical")]
    if fusion is not None and all(s is not None for s in single):
        print(f"wdbc fusion AUC / best single-modality AUC = {fusion / max(single):.4f}")
    if args.out:
        settings = {"seeds": args.seeds, "epochs": args.epochs, "batch_size": args.batch_size, "only": args.only}
        print(f"wrote {write_json(args.out, {'settings': settings, 'rows': rows}, started)}")


if __name__ == "__main__":
    main()
