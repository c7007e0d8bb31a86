"""Cost of hardened DP noise: Opacus' secure-mode noise and a per-step os.urandom reseed vs the default.

Issue 16 item 9: DP noise comes from one torch generator seeded once from ``os.urandom``
(``common.privacy._secret_generator``). Two hardenings, measured here on the default fusion model in
Opacus hooks mode (``dp_overhead.build``: batch 64, one optimizer step), steps interleaved so the ratios
hold on a shared machine (``default``: Opacus' default noise, ``secure_mode`` off, though
``make_private`` now turns it on):

- ``secure_noise``: Opacus' ``DPOptimizer.secure_mode`` noise (``_generate_noise``: 4 Gaussian draws
  summed / 2 plus one discarded draw; robust to the floating-point attacks of arXiv 2107.10138 and
  2112.05307). ``PrivacyEngine(secure_mode=True)`` itself cannot be used: it needs ``torchcsprng``,
  which has no build for torch 2.14 (not installable here);
- ``reseed``: the same default noise, its generator reseeded from ``os.urandom`` before every step, so
  recovering one step's generator state reveals nothing about another step's noise.

    python benchmarks/dp_secure_noise.py --steps 20
    python benchmarks/dp_secure_noise.py --steps 20 --json docs/results/dp_secure_noise.json   # + provenance
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_overhead import build  # noqa: E402  (benchmarks/ is not a package)
from provenance import provenance, write_json  # noqa: E402


def _optimizer_of(step) -> torch.optim.Optimizer:  # noqa: ANN001 - the closure build() returns
    cells = {name: cell.cell_contents for name, cell in zip(step.__code__.co_freevars, step.__closure__, strict=True)}
    return cells["optimizer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", "--out", dest="out", metavar="PATH", default="",
                        help="also write the row and its provenance here")
    args = parser.parse_args()
    started = provenance()
    device = torch.device(args.device)
    steps = {}
    for variant in ("default", "secure_noise", "reseed"):
        step, params = build("default", "hooks", device, args.batch_size)
        optimizer = _optimizer_of(step)
        # make_private now switches secure-mode noise on itself: "default" and "reseed" turn it off again so
        # the comparison stays Opacus' default noise vs secure-mode noise, as when the switch was decided.
        optimizer.secure_mode = variant == "secure_noise"
        if variant == "reseed":
            inner = step

            def step(inner=inner, generator=optimizer.generator) -> None:  # noqa: ANN001
                generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
                inner()
        steps[variant] = step
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(args.steps):
        for variant, step in steps.items():
            began = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - began)
    base = statistics.median(times["default"])
    row = {"device": str(device), "torch_threads": torch.get_num_threads(), "params": params, "steps": args.steps,
           **{f"{v}_ms": 1000 * statistics.median(t) for v, t in times.items()},
           **{f"{v}_ratio": statistics.median(t) / base for v, t in times.items() if v != "default"}}
    print(json.dumps(row, indent=2))
    if args.out:
        settings = {"model": "default", "mode": "hooks", "warmup": args.warmup, "batch_size": args.batch_size}
        print(f"wrote {write_json(args.out, {'settings': settings, 'row': row}, started)}")


if __name__ == "__main__":
    main()
