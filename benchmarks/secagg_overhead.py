"""Secure-aggregation compute and bytes overhead, in process (no network, no training).

Prints, measured in one run, for each model size and number of sites: a site's quantise + mask
time (stage 3), the server's collect + unmask time (stages 3-4), the time of everything else
(keys and share bundles, all sites), and the plain float64 weighted sum the server would otherwise
compute (as ``modality_weighted_average`` does); then the bytes a site sends (masked vector, key
advertisement, share bundles) against the raw float32 update.

    python benchmarks/secagg_overhead.py                       # 1M and 10M parameters, 3 and 10 sites
    python benchmarks/secagg_overhead.py --params 1e6 --sites 3 10 50 --bits 64
    python benchmarks/secagg_overhead.py --json docs/results/secagg_overhead.json   # + raw rows, provenance
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedfusion.common.secagg import SecAggClient, SecAggConfig, SecAggServer, VectorLayout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)

T = TypeVar("T")
GROUPS = ("image", "clinical", "shared")


def _timed(call: Callable[[], T]) -> tuple[T, float]:
    began = time.perf_counter()
    result = call()
    return result, time.perf_counter() - began


def _plain_weighted_sum(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    total = sum(weights)
    out = {}
    for name in updates[0]:
        acc = np.zeros(updates[0][name].shape, dtype=np.float64)
        for update, weight in zip(updates, weights, strict=True):
            acc += update[name].astype(np.float64) * (weight / total)
        out[name] = acc.astype(np.float32)
    return out


def measure(params: int, sites: int, bits: int, clip: float, seed: int = 0) -> dict[str, float]:
    """One secure round and one plain aggregation on the same random float32 updates."""
    rng = np.random.default_rng(seed)
    sizes = {"image.w": params // 2, "clinical.w": params // 4, "head.w": params - params // 2 - params // 4}
    groups = {"image.w": "image", "clinical.w": "clinical", "head.w": "shared"}
    layout = VectorLayout({name: (size,) for name, size in sizes.items()}, groups)
    nodes = list(range(1, sites + 1))
    updates = [{name: rng.uniform(-clip, clip, size).astype(np.float32) for name, size in sizes.items()} for _ in nodes]
    weights = [{group: float(rng.integers(100, 1000)) for group in GROUPS} for _ in nodes]

    config = SecAggConfig.create(nodes, layout, clip=clip, bits=bits, weight_bound=1000.0)
    clients = {n: SecAggClient(n, config, layout) for n in nodes}
    server = SecAggServer(config, layout)
    began = time.perf_counter()
    keys = {n: c.advertise_keys() for n, c in clients.items()}
    broadcast = server.collect_keys(keys)
    bundles = {n: c.share_keys(broadcast) for n, c in clients.items()}
    routed = server.route_shares(bundles)
    setup = time.perf_counter() - began

    masked, client_times = {}, []
    for i, node in enumerate(nodes):
        began = time.perf_counter()
        masked[node] = clients[node].masked_input(routed[node], updates[i], weights[i]).vector
        client_times.append(time.perf_counter() - began)
    request, collect = _timed(lambda: server.collect_masked_inputs(masked))
    replies, reply_time = _timed(lambda: {n: clients[n].unmask(request) for n in request.survivors})
    aggregate, unmask = _timed(lambda: server.unmask(replies))

    _, plain = _timed(lambda: _plain_weighted_sum(updates, [w["shared"] for w in weights]))
    expected = _plain_weighted_sum(updates, [w["shared"] for w in weights])["head.w"]
    error = float(np.abs(aggregate.averages()["head.w"] - expected).max())

    vector_bytes = masked[nodes[0]].nbytes
    share_bytes = sum(len(ct) for ct in bundles[nodes[0]].values()) + 64  # + two public keys
    return {
        "client": float(np.mean(client_times)),
        "server": collect + unmask,
        "setup": setup + reply_time,
        "plain": plain,
        "vector_bytes": vector_bytes,
        "other_bytes": share_bytes,
        "float32_bytes": params * 4,
        "degree": config.degree,
        "error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--bits", type=int, default=32, help="modulus bits (32: masked vector = float32 size)")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3, help="rounds per setting; the fastest of each time is kept")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and their provenance here")
    args = parser.parse_args()
    started = provenance()
    rows: list[dict[str, Any]] = []

    print(
        f"modulus 2^{args.bits}, clip {args.clip}; seconds (fastest of {args.repeat} rounds), "
        "ratios against the plain weighted sum"
    )
    header = (
        f"{'params':>8} {'sites':>5} {'k':>3} {'plain sum':>9} {'site q+mask':>11} {'x plain':>7} "
        f"{'server unmask':>13} {'x plain':>7} {'keys+shares':>11} {'bytes/fp32':>10} {'max abs err':>11}"
    )
    print(header)
    for params in (int(p) for p in args.params):
        for sites in args.sites:
            runs = [measure(params, sites, args.bits, args.clip, seed) for seed in range(args.repeat)]
            r = {key: min(run[key] for run in runs) for key in runs[0]}
            r["error"] = max(run["error"] for run in runs)
            ratio_bytes = (r["vector_bytes"] + r["other_bytes"]) / r["float32_bytes"]
            rows.append({"params": params, "sites": sites, **r, "client_x_plain": r["client"] / r["plain"],
                         "server_x_plain": r["server"] / r["plain"], "bytes_per_float32": ratio_bytes})
            print(
                f"{params:>8.0e} {sites:>5} {r['degree']:>3.0f} {r['plain']:>9.3f} {r['client']:>11.3f} "
                f"{r['client'] / r['plain']:>7.2f} {r['server']:>13.3f} {r['server'] / r['plain']:>7.2f} "
                f"{r['setup']:>11.3f} {ratio_bytes:>10.4f} {r['error']:>11.2e}"
            )
    print(
        "site q+mask: one site's stage 3 (weight, clip, quantise, expand and add 1 + k AES-CTR masks); "
        "server unmask: summing the masked vectors, rebuilding seeds, removing the n self masks; "
        "keys+shares: stages 1-2 and the unmask replies for all sites together; "
        "bytes/fp32: (masked vector + keys + share bundles) sent by one site / float32 update bytes."
    )
    if args.json:
        settings = {"bits": args.bits, "clip": args.clip, "repeat": args.repeat, "times": "seconds, fastest of repeat"}
        print(f"wrote {write_json(args.json, {'settings': settings, 'rows': rows}, started)}")


if __name__ == "__main__":
    main()
