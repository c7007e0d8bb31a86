"""fedfusion's secure aggregation against Flower's built-in SecAgg+, same vector, same sites, one run.

No training and no Ray: every site's "training" adds small random noise to the global model (a
float32 model of N parameters in ``--tensors`` arrays, 100 by default like the fusion model's state_dict),
so a round's cost is the protocol's and the wire format's. Our plain round runs twice: with the packed
wire format (common/packing.py: one Array per aggregation group) and with the per-tensor format of before
(``per-tensor s``). All columns of one setting are run interleaved, ``--repeat`` times, fastest kept.
Both sides run in process over the same loopback Grid (``tests/secagg_fakes.py``), which
serialises every message, reply and site state through Flower's protobuf serde:

* ours: the real ClientApp stage handlers (``make_app`` wiring) and the server's plain round
  (``configure_train`` -> ``send_and_collect`` -> ``aggregate_train``) or ``run_secure_round``;
* Flower: legacy ``DefaultWorkflow`` with its default fit workflow (FedAvg) or
  ``SecAggPlusWorkflow``; sites are a NumPyClient behind ``secaggplus_mod``. Round time is from the
  strategy's ``configure_fit`` to the end of its ``aggregate_fit``.

Bytes: serialised size (``serialized_size``: Flower's protobuf) of everything one site sends in a secure round (ours:
keys, share bundles, masked vector, consistency signature, unmask shares; Flower's SecAgg+: its stage
replies) / the raw float32 update (4 N bytes), and ours / Flower's.

    python benchmarks/secagg_vs_flower.py                          # 3 and 10 sites, 1M and 10M
    python benchmarks/secagg_vs_flower.py --sites 3 10 50 --params 1e6 --repeat 2
    python benchmarks/secagg_vs_flower.py --params 1e6 --sites 3 10 --repeat 3 --json docs/results/x.json
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from provenance import provenance, write_json  # noqa: E402

from fedfusion.client.secure_aggregation import refuse_unmasked_update, register_secure_aggregation  # noqa: E402
from fedfusion.common.federation_config import FederationConfig  # noqa: E402
from fedfusion.common.flower_adapter import message_identity, serialized_size  # noqa: E402
from fedfusion.common.packing import LAYOUT_KEY, PackLayout, sent_layout  # noqa: E402
from fedfusion.common.records import (  # noqa: E402
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    SITE_KEY,
    arrays_to_numpy,
    modality_count_key,
    numpy_to_arrays,
)
from fedfusion.server.messaging import send_and_collect  # noqa: E402
from fedfusion.server.secure_aggregation import run_secure_round  # noqa: E402
from fedfusion.server.strategy import build_strategy  # noqa: E402
from tests.secagg_fakes import MODALITIES, TESTBED_SITES, LoopbackGrid, identity_config  # noqa: E402

NOISE = 0.01
RUN = {"secure-aggregation": True, "secagg-clip": 1.0, "secagg-bits": 32, "secagg-weight-bound": 10_000.0,
       "secagg-timeout": 600.0, "round-timeout": 600.0, "min-sites": 1}
PARTS = {"image": "image", "omics": "omics", "clinical": "clinical", "fusion": "fusion", "head": "head"}
#: state_dict key -> group of the benchmark model (set by :func:`model`, read by the strategy and the sites)
GROUPS: dict[str, str] = {}


def model(params: int, tensors: int = 5) -> dict[str, np.ndarray]:
    """A float32 model of ``params`` parameters in ``tensors`` arrays (the fusion model has ~100), split over
    the five parts 40/25/15/15/5 % of the parameters."""
    fractions = (0.4, 0.25, 0.15, 0.15)
    sizes = [int(params * f) for f in fractions]
    sizes.append(params - sum(sizes))
    per_part = [max(1, round(tensors * size / params)) for size in sizes]
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    GROUPS.clear()
    for part, size, count in zip(PARTS, sizes, per_part, strict=True):
        bounds = np.linspace(0, size, count + 1).astype(int)
        for i in range(count):
            name = f"{part}.w{i}"
            out[name] = (rng.normal(size=int(bounds[i + 1] - bounds[i])) * 0.1).astype(np.float32)
            GROUPS[name] = PARTS[part]
    return out


class Grid(LoopbackGrid):
    """The loopback Grid plus what Flower's legacy workflows call (``send_and_receive``, ``run``)."""

    class _Run:
        run_id = 1

    run = _Run()

    sizing = False
    """Record each reply's serialised size as it is pulled (Flower's legacy server empties a reply's
    ArrayRecord while converting it, so sizes are taken before that); off in timed rounds."""

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(list(messages)))

    def pull_messages(self, message_ids: Any) -> list[Message]:
        found = super().pull_messages(message_ids)
        if self.sizing:
            self.sizes = getattr(self, "sizes", []) + [
                (int(m.metadata.src_node_id), serialized_size(m.content))
                for m in found if m.has_content()]
        return found


# ----------------------------------------------------------------------------------------------- ours
def our_app(node_ids: list[int], run_config: dict[str, Any], reference: dict[str, np.ndarray]) -> ClientApp:
    """Sites as client/app.py's train handler treats the wire: unpack the global model with the layout of
    their own model (``reference``: names, shapes, dtypes), answer packed when asked packed."""
    rngs = {n: np.random.default_rng(n) for n in node_ids}
    layout = PackLayout.of(reference, GROUPS)

    def train(msg: Message, context: Context) -> Message:
        node = int(msg.metadata.dst_node_id)
        rng = rngs[node]
        config = msg.content.config_records.get(CONFIG_KEY)
        packed = sent_layout(config) is not None
        record = msg.content[ARRAYS_KEY]
        current = layout.unpack(record, sent_layout(config)) if packed else arrays_to_numpy(record)
        new = {k: v + (rng.standard_normal(v.size, dtype=np.float32) * NOISE) for k, v in current.items()}
        counts = {NUM_EXAMPLES: 100.0 + node, **{modality_count_key(m): 100.0 + node for m in MODALITIES}}
        site = {"site-id": f"site{node}", **({LAYOUT_KEY: layout.sha256} if packed else {})}
        arrays = layout.pack(new) if packed else numpy_to_arrays(new)
        return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(counts),
                                   SITE_KEY: ConfigRecord(site)}), reply_to=msg)

    app = ClientApp()

    def config_fn(context: Context) -> tuple[FederationConfig, dict[str, Any]]:
        flat = {**run_config, **dict(context.run_config)}
        return FederationConfig.from_run_config(flat), flat

    app.train(mods=[refuse_unmasked_update(config_fn)])(train)
    register_secure_aggregation(app, train, config_fn)
    return app


def ours(params: int, sites: int, secure: bool, tensors: int = 5, packed: bool = True,
         sizing: bool = False) -> tuple[float, float]:
    """(round seconds, bytes one site sent / float32 update bytes); ``packed=False``: the per-tensor wire
    format the plain round used before common/packing.py (one Array per tensor both ways)."""
    nodes = list(range(1, sites + 1))
    run_config = {**RUN, "secure-aggregation": secure}
    weights = model(params, tensors)
    # every site has its roster entry and signing key (secure aggregation refuses to run without them)
    grid = Grid(our_app(nodes, run_config, weights), nodes,
                node_configs={n: identity_config(TESTBED_SITES[n - 1]) for n in nodes})
    grid.sizing = sizing
    strategy = build_strategy("fedavg", GROUPS, min_sites=1, fraction_evaluate=0.0)
    if not packed:
        strategy._packed = lambda values, config: (numpy_to_arrays(values), config)  # type: ignore[method-assign]
    cfg = FederationConfig.from_run_config(run_config)
    arrays = numpy_to_arrays(weights)
    began = time.perf_counter()
    if secure:
        outcome = run_secure_round(grid, strategy, 1, arrays, cfg)
        assert outcome.failure == "" and outcome.arrays is not None, outcome.failure
    else:
        replies = send_and_collect(grid, strategy.configure_train(1, arrays, ConfigRecord(), grid),
                                   timeout=cfg.round_timeout)
        new, _ = strategy.aggregate_train(1, replies)
        assert new is not None
    seconds = time.perf_counter() - began
    return seconds, sent_bytes(grid, nodes[0]) / (4 * params)


def sent_bytes(grid: Grid, node: int) -> float:
    """Serialised bytes of every reply ``node`` sent in the round (NaN unless the grid was sizing)."""
    if not grid.sizing:
        return math.nan
    return float(sum(size for src, size in getattr(grid, "sizes", []) if src == node))


# ----------------------------------------------------------------------------------------- Flower's
def flower(params: int, sites: int, secure: bool, tensors: int = 5, sizing: bool = False) -> tuple[float, float]:
    """(round seconds, bytes one site sent / float32 update bytes) of Flower's legacy round."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.compat import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class Noisy(NumPyClient):
        def __init__(self, node: int) -> None:
            self.rng = np.random.default_rng(node)

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
            return [p + self.rng.standard_normal(p.size, dtype=np.float32) * NOISE for p in parameters], 100, {}

    app = ClientApp(client_fn=lambda context: Noisy(context.node_id).to_client(),
                    mods=[secaggplus_mod] if secure else [])
    times: dict[str, float] = {}

    class Timed(FedAvg):
        def configure_fit(self, *args: Any, **kwargs: Any) -> Any:
            times["start"] = time.perf_counter()
            return super().configure_fit(*args, **kwargs)

        def aggregate_fit(self, *args: Any, **kwargs: Any) -> Any:
            result = super().aggregate_fit(*args, **kwargs)
            times["end"] = time.perf_counter()
            return result

    nodes = list(range(1, sites + 1))
    grid = Grid(app, nodes)
    grid.sizing = sizing
    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=sites, min_available_clients=sites,
                     initial_parameters=ndarrays_to_parameters(list(model(params, tensors).values())))
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy)
    if secure:
        shares = sites if sites <= 5 else 0.4  # integer num_shares must be > 2
        workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=0.5))
    else:
        workflow = DefaultWorkflow()
    workflow(grid, context)
    assert "end" in times, "Flower's fit round did not aggregate"
    return times["end"] - times["start"], sent_bytes(grid, nodes[0]) / (4 * params)


def run_column_fresh(column: str, params: int, sites: int, tensors: int) -> tuple[float, float]:
    """:func:`run_column` in a new process (``--fresh-process``): at 10M parameters a round's time depends on
    what the allocator holds from the rounds before it (measured: Flower's plain round 0.62-1.21 s in one
    process), so each round starts from the same empty state; imports and the warm-up are not timed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_fresh_round, column, params, sites, tensors).result()


def _fresh_round(column: str, params: int, sites: int, tensors: int) -> tuple[float, float]:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    message_identity()
    run_column(column, 10_000, 3, tensors)  # warm-up: imports, first-call caches
    return run_column(column, params, sites, tensors)


def run_column(column: str, params: int, sites: int, tensors: int, sizing: bool = False) -> tuple[float, float]:
    """One round of one table column: (seconds, bytes one site sent / 4 N; NaN unless ``sizing``, whose
    serialising of every reply makes that round's time not comparable)."""
    if column == "per_tensor":
        return ours(params, sites, False, tensors, packed=False, sizing=sizing)
    secure = column.endswith("secure")
    return (flower if column.startswith("flower") else ours)(params, sites, secure, tensors, sizing=sizing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--repeat", type=int, default=1, help="rounds per setting; the fastest is kept")
    parser.add_argument("--tensors", type=int, default=100,
                        help="arrays the model is split into (the fusion model's state_dict has ~100)")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--fresh-process", action="store_true",
                        help="time every round in a new process (same allocator state for every column)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    started = provenance()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    message_identity()  # what Flower's runtime sets in a process: lets this script build Messages
    header = (f"{'sites':>5} {'params':>7} {'tensors':>7} {'per-tensor s':>12} {'our plain s':>11} "
              f"{'our secure s':>12} {'ours sec/pl':>11} {'Fl plain s':>10} {'Fl SecAgg+ s':>12} {'Fl sec/pl':>9} "
              f"{'ours/Fl pl':>10} {'ours/Fl sec':>11} {'bytes/fp32':>10} {'B ours/Fl pl':>12} {'B ours/Fl sec':>13}")
    rows, results = [], []
    for secure in (False, True):  # warm-up: imports, the test bed's keys, first-call caches
        ours(10_000, 3, secure, args.tensors)
        if not args.no_flower:
            flower(10_000, 3, secure, args.tensors)
    columns = ("per_tensor", "plain", "secure", "flower_plain", "flower_secure")
    for params in (int(p) for p in args.params):
        for sites in args.sites:
            times: dict[str, list[float]] = {k: [] for k in columns}
            sent: dict[str, float] = dict.fromkeys(columns, math.nan)  # bytes one site sent / 4 N (same every repeat)
            for _ in range(args.repeat):  # interleaved, so a load spike hits every column alike
                for column in columns:
                    if args.no_flower and column.startswith("flower"):
                        continue
                    run = run_column_fresh if args.fresh_process else run_column
                    times[column].append(run(column, params, sites, args.tensors)[0])
            for column in columns:  # bytes: one untimed round per column
                if not (args.no_flower and column.startswith("flower")):
                    sent[column] = run_column(column, params, sites, args.tensors, sizing=True)[1]
            best = {k: min(v) if v else math.nan for k, v in times.items()}
            pt, plain, secure, fp, fs = (best[k] for k in columns)
            row = (f"{sites:>5} {params:>7.0e} {args.tensors:>7} {pt:>12.2f} {plain:>11.2f} {secure:>12.2f} "
                   f"{secure / plain:>11.2f} {fp:>10.2f} {fs:>12.2f} {fs / fp:>9.2f} {plain / fp:>10.2f} "
                   f"{secure / fs:>11.2f} {sent['secure']:>10.3f} {sent['plain'] / sent['flower_plain']:>12.3f} "
                   f"{sent['secure'] / sent['flower_secure']:>13.3f}")
            rows.append(row)
            results.append({"sites": sites, "params": params, "tensors": args.tensors, "repeat": args.repeat,
                            "seconds": times, "fastest": best, "bytes_per_fp32": sent,
                            "ratios": {"plain_vs_flower_plain": plain / fp, "secure_vs_flower_secagg": secure / fs,
                                       "bytes_plain_vs_flower": sent["plain"] / sent["flower_plain"],
                                       "bytes_secure_vs_flower": sent["secure"] / sent["flower_secure"]}})
            print(row, flush=True)
    print(f"\nseconds per round (fastest of {args.repeat}), in process over a serialising loopback Grid, no Ray")
    print(header)
    print("\n".join(rows))
    if args.json:
        write_json(args.json, {"results": results}, started)


if __name__ == "__main__":
    main()
