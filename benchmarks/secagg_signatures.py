"""Extra cost of the malicious-coordinator protections: signed key advertisements and the consistency round.

For each number of sites, the same in-process secure round (``fedfusion.common.secagg.run_round``: every
site's and the server's real protocol code in one process, one site after another) runs unsigned and
signed (roster of real ECDSA P-256 keys: each site signs its advertisement, verifies every peer's, signs
the survivor set and verifies a majority's signatures), alternated, fastest of ``--repeat`` each. Printed:
both times, the extra time, the ratio, and the extra per site (sites run in parallel in a deployment, so
that is what one round waits for: each site verifies n advertisements and up to n survivor signatures).

    python benchmarks/secagg_signatures.py                      # 10 and 50 sites, 100k parameters
    python benchmarks/secagg_signatures.py --sites 10 50 --params 1000000 --repeat 3
    python benchmarks/secagg_signatures.py --json docs/results/secagg_signatures.json   # + raw rows, provenance
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedfusion.common.roster import load_signing_key
from fedfusion.common.secagg import SecAggConfig, VectorLayout, run_round
from fedfusion.common.secagg.testbed import partition_key_path, write_testbed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_json  # noqa: E402  (benchmarks/ is not a package)


def measure(sites: int, params: int, repeat: int, folder: Path) -> dict[str, float]:
    roster = write_testbed(folder, [f"site-{i}" for i in range(sites)])
    nodes = list(range(1, sites + 1))
    identities = {n: (f"site-{n - 1}", load_signing_key(partition_key_path(folder, n - 1))) for n in nodes}
    layout = VectorLayout({"w": (params,)}, {"w": "shared"})
    rng = np.random.default_rng(0)
    updates = {n: {"w": rng.uniform(-0.1, 0.1, params)} for n in nodes}
    weights = {n: {"shared": 100.0} for n in nodes}
    best = {"unsigned": float("inf"), "signed": float("inf")}
    for _ in range(repeat):
        for label in ("unsigned", "signed"):
            config = SecAggConfig.create(nodes, layout, clip=1.0, weight_bound=1000.0)
            signed = {"identities": identities, "roster": roster} if label == "signed" else {}
            began = time.perf_counter()
            run_round(config, layout, updates, weights, **signed)
            best[label] = min(best[label], time.perf_counter() - began)
    return {**best, "extra": best["signed"] - best["unsigned"], "ratio": best["signed"] / best["unsigned"],
            "extra_per_site": (best["signed"] - best["unsigned"]) / sites, "degree": float(config.degree)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and their provenance here")
    args = parser.parse_args()
    started = provenance()
    rows: list[dict[str, Any]] = []
    print(f"{'sites':>5} {'degree':>6} {'unsigned s':>10} {'signed s':>9} {'extra s':>8} {'ratio':>6} "
          f"{'extra/site ms':>13}")
    for sites in args.sites:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(sites, args.params, args.repeat, Path(tmp))
        rows.append({"sites": sites, **r})
        print(f"{sites:>5} {r['degree']:>6.0f} {r['unsigned']:>10.3f} {r['signed']:>9.3f} {r['extra']:>8.3f} "
              f"{r['ratio']:>6.3f} {1000 * r['extra_per_site']:>13.1f}")
    if args.json:
        settings = {"params": args.params, "repeat": args.repeat, "times": "seconds, fastest of repeat"}
        print(f"wrote {write_json(args.json, {'settings': settings, 'rows': rows}, started)}")


if __name__ == "__main__":
    main()
