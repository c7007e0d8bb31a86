"""Scale: 10,000 simulated sites, 100 sampled per round, the default fusion model on real rows.

What it runs: ``wdbc-multimodal`` (569 real patients; a 64x64 image rendered from each patient's
own morphometry + 20 clinical features), the default fusion model of ``create_model`` for that
schema (attention fusion, ``cnn_small`` image encoder, clinical MLP), in Flower's simulation
runtime on Ray with one CPU per site. Every one of the ``--sites`` virtual sites holds
``--rows-per-site`` distinct real rows drawn on demand from the pooled manifest
(``simulations/scale_sites.py``; rows are reused ACROSS sites: with 10,000 sites and 569 rows a
case sits at ~880 sites). Each round Flower samples ``--fraction`` of the sites to train and the same
fraction to evaluate (evaluation is sampled, not skipped: its time counts as non-training).

What it prints, per round (round 0 only evaluates the initial model and is left out):

- wall time of the round (train phase + evaluation phase + aggregation + checkpoint, server side);
- training time = ``train-seconds`` summed over the sampled sites, each measured inside the
  ClientApp around the local training loop only (``SiteRuntime.train``);
- the non-training share = 1 - training / (round wall time x parallel workers), workers = the Ray
  actors that train at once (cores / CPUs per site). Its parts: our client handler outside the
  loop (site build, model build, (de)serialisation: ``client-seconds`` - ``train-seconds``), the
  evaluation phase, and the rest (Flower/Ray messaging and scheduling, idle workers, server-side
  aggregation and checkpoint);
- peak memory: the largest sampled SUM of resident set sizes (``VmRSS`` in /proc, every 0.25 s) over
  the driver and all its descendant processes (Ray's GCS, raylet, object store and the worker
  actors), and, as an upper bound, the sum of each process's own high-water mark (``VmHWM``).

Usage: ``python benchmarks/scale.py`` (defaults: 10,000 sites, 1 %, 3 rounds, 2 CPUs);
``--json docs/results/scale.json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)

GOAL_NON_TRAINING_SHARE = 0.20
GOAL_PEAK_GB = 8.0


# --------------------------------------------------------------------------- memory (/proc, no psutil)
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant (Ray's local cluster processes are children of the driver)."""
    children = _children_map()
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Samples the process tree's summed RSS; keeps its peak and each process's own VmHWM."""

    def __init__(self, root: int, interval_s: float = 0.25):
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.peak_rss_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.max_processes = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        pids = process_tree(self.root)
        self.max_processes = max(self.max_processes, len(pids))
        self.peak_rss_kb = max(self.peak_rss_kb, sum(_status_kb(p, "VmRSS") for p in pids))
        for pid in pids:
            hwm = _status_kb(pid, "VmHWM")
            if hwm:
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


# --------------------------------------------------------------------------- the run
def round_breakdown(result: Any, workers: int) -> list[dict[str, float]]:
    """Per trained round: wall time, summed training and client-handler time, the non-training share."""
    rows = []
    for row in result.rounds:
        r = int(row["round"])
        if r == 0:
            continue
        trained = [m for m in result.site_metrics if m["phase"] == "train" and m["round"] == r]
        train_s = float(sum(float(m.get("train-seconds", 0.0)) for m in trained))
        client_s = float(sum(float(m.get("client-seconds", 0.0)) for m in trained))
        wall, train_phase = float(row["seconds"]), float(row["train_phase_seconds"])
        capacity = wall * workers
        eval_phase = wall - train_phase
        rows.append({
            "round": r, "sites_trained": len(trained),
            "sites_evaluated": sum(1 for m in result.site_metrics if m["phase"] == "evaluate" and m["round"] == r),
            "round_seconds": wall, "train_phase_seconds": train_phase, "eval_phase_seconds": eval_phase,
            "training_seconds_summed": train_s, "client_handler_seconds_summed": client_s,
            "non_training_share": 1.0 - train_s / capacity,
            "train_phase_non_training_share": 1.0 - train_s / (train_phase * workers),
            # the parts of (capacity - training), as shares of capacity
            "share_client_outside_training": (client_s - train_s) / capacity,
            "share_evaluation_phase": eval_phase * workers / capacity,
            "share_flower_ray_server_idle": (train_phase * workers - client_s) / capacity,
            "eval_auc": float(row.get("eval_auc", float("nan"))),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=10_000)
    parser.add_argument("--fraction", type=float, default=0.01, help="share of sites sampled per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dataset", default="wdbc-multimodal")
    parser.add_argument("--rows-per-site", type=int, default=50)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPU cores Ray may use (one site per core)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers and their provenance here")
    args = parser.parse_args()
    begun = provenance()

    os.environ.pop("RAY_ADDRESS", None)  # a private local Ray with exactly --cpus cores
    started = time.monotonic()
    sampler = MemorySampler(os.getpid())
    sampler.start()

    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    from fedfusion.simulations import simulate as sim

    spec = sim.SimulationSpec(dataset=args.dataset, out_dir=args.out.resolve(), rounds=args.rounds,
                              local_epochs=args.local_epochs, baselines=False, scale_sites=args.sites,
                              rows_per_site=args.rows_per_site, fraction_train=args.fraction,
                              fraction_evaluate=args.fraction)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    schema_path, sites = sim.prepare_sites(spec)
    run_config = sim.run_config_for(spec, schema_path, sites)
    stamps: list[float] = []

    def on_round(row: dict[str, Any]) -> None:
        stamps.append(time.monotonic())
        auc = row.get("eval_auc", float("nan"))
        print(f"round {row['round']}: {row.get('seconds', 0.0):.1f} s, eval AUC {auc:.3f}", flush=True)

    result = sim.run_simulated_federation(run_config, args.sites, on_round=on_round, num_cpus=args.cpus)
    total = time.monotonic() - started
    sampler.stop()

    workers = args.cpus  # one CPU per site: this many ClientApps train at once
    rounds = round_breakdown(result, workers)
    mean = {k: float(np.mean([r[k] for r in rounds])) for k in rounds[0] if k != "round"}
    peak_gb = sampler.peak_rss_kb / 1024**2
    hwm_gb = sum(sampler.hwm_kb.values()) / 1024**2
    load = os.getloadavg()
    out = {
        # command, commit, machine and load averages: under "provenance" (write_json)
        "machine": f"{platform.machine()}, {os.cpu_count()} cores visible, Ray limited to {args.cpus}",
        "sites": args.sites, "sampled_per_round": int(args.sites * args.fraction), "rounds": args.rounds,
        "dataset": args.dataset, "rows_per_site": args.rows_per_site, "local_epochs": args.local_epochs,
        "model": "create_model defaults (fusion attention, image backbone cnn_small)",
        "parallel_workers": workers,
        "startup_seconds_to_round0_done": (stamps[0] - started) if stamps else float("nan"),
        "total_seconds": total,
        "per_round": rounds, "mean_over_rounds": mean,
        "peak_rss_sum_gb": peak_gb, "sum_of_process_hwm_gb": hwm_gb,
        "max_processes_in_tree": sampler.max_processes,
        "goal_non_training_share": GOAL_NON_TRAINING_SHARE,
        "goal_peak_memory_gb": GOAL_PEAK_GB,
        "non_training_share_met": mean["non_training_share"] <= GOAL_NON_TRAINING_SHARE,
        "memory_met": peak_gb < GOAL_PEAK_GB,
    }
    print(f"\n{args.sites} sites, {out['sampled_per_round']} sampled per round, {args.rounds} rounds, "
          f"{args.dataset} ({args.rows_per_site} rows/site), {workers} workers; load {load[0]:.2f}")
    for r in rounds:
        print(f"  round {r['round']}: {r['round_seconds']:.1f} s (train phase {r['train_phase_seconds']:.1f} s, "
              f"eval phase {r['eval_phase_seconds']:.1f} s), training summed {r['training_seconds_summed']:.1f} s, "
              f"non-training share {r['non_training_share']:.1%} (train phase only "
              f"{r['train_phase_non_training_share']:.1%}), eval AUC {r['eval_auc']:.3f}")
    print(f"  mean time per round: {mean['round_seconds']:.1f} s; non-training share {mean['non_training_share']:.1%} "
          f"(goal <= {GOAL_NON_TRAINING_SHARE:.0%}: {'met' if out['non_training_share_met'] else 'NOT met'}) = "
          f"client outside training {mean['share_client_outside_training']:.1%} + evaluation phase "
          f"{mean['share_evaluation_phase']:.1%} + Flower/Ray/server/idle {mean['share_flower_ray_server_idle']:.1%}")
    print(f"  peak memory (summed RSS of driver + Ray processes): {peak_gb:.2f} GB "
          f"(goal < {GOAL_PEAK_GB:.0f} GB: {'met' if out['memory_met'] else 'NOT met'}); sum of per-process "
          f"high-water marks {hwm_gb:.2f} GB over {sampler.max_processes} processes at most")
    print(f"  startup to the end of round 0: {out['startup_seconds_to_round0_done']:.1f} s; total {total:.1f} s")
    if args.json:
        print(f"wrote {write_json(args.json, out, begun)}")


if __name__ == "__main__":
    main()
