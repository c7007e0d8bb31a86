"""The ``fedfusion`` command: a thin dispatcher at the top of the import graph (nothing imports it).

Each sub-command imports its implementation lazily so ``fedfusion --help`` and ``site check`` do
not pay for torch/Flower imports they do not need.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_site_check(args: argparse.Namespace) -> int:
    from fedfusion.client.site_check import check_site

    return check_site(Path(args.manifest), Path(args.schema), check_images=not args.no_images,
                      allow_single_class=args.allow_single_class)


def _cmd_datasets_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedfusion.simulations.datasets import list_datasets

    table = Table(title="real data sets that ship inside packages (nothing is downloaded)")
    for column in ("name", "task", "sites", "source", "description"):
        table.add_column(column, overflow="fold")
    for info in list_datasets():
        table.add_row(info.name, info.task, str(info.site_column or "-"), info.source, info.description)
    Console().print(table)
    return 0


def _cmd_datasets_build(args: argparse.Namespace) -> int:
    from fedfusion.simulations.datasets import DatasetError, build_dataset

    try:
        schema_path = build_dataset(args.name, Path(args.out), seed=args.seed)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {schema_path.parent / 'manifest.csv'} and {schema_path}")
    return 0


def _cmd_train_local(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedfusion.common.config import ConfigError, ModelConfig, TrainConfig, load_schema
    from fedfusion.common.manifest import ManifestError
    from fedfusion.common.training import primary_metric
    from fedfusion.simulations.local_training import load_for_training, run_local_training

    try:
        schema = load_schema(args.schema)
        manifest = load_for_training(Path(args.manifest), schema, args.seed, args.modalities, args.site,
                                     resplit=args.resplit)
        model_cfg = ModelConfig(fusion=args.fusion, image_backbone=args.backbone,
                                pretrained_path=args.pretrained_path)
        train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                patience=args.patience, device=args.device)
    except (ConfigError, ManifestError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metric = primary_metric(manifest.schema)
    out = Path(args.out) if args.out else None
    with Progress(TextColumn("[bold]train-local[/]"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), transient=False) as progress:
        task = progress.add_task("starting", total=train_cfg.epochs)

        def on_epoch(row: dict[str, float]) -> None:
            score = row.get(f"val_{metric}", float("nan"))
            progress.update(task, advance=1, description=(
                f"epoch {int(row['epoch'])}/{train_cfg.epochs} loss {row['train_loss']:.4f} val {metric} {score:.3f}"))

        result = run_local_training(manifest, model_cfg, train_cfg, out_dir=out, on_epoch=on_epoch)
    print(json.dumps({"test": result.test, "best_epoch": result.best_epoch,
                      "out_dir": str(out) if out else None}, indent=2))
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fedfusion.simulations.simulate import SimulationSpec, simulate

    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler; do not print twice
    out = Path(args.out or f"runs/{args.dataset}-{args.partition}-{args.strategy}")
    spec = SimulationSpec(dataset=args.dataset, out_dir=out, partition=args.partition, num_sites=args.num_sites,
                          rounds=args.rounds, strategy=args.strategy, fusion=args.fusion,
                          local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          baselines=not args.no_baselines, baseline_epochs=args.baseline_epochs, device=args.device,
                          gpus_per_site=args.gpus_per_site)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]federated rounds[/]"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("building sites", total=args.rounds + 1)

        def on_round(row: dict) -> None:
            metric = next((k for k in ("eval_c_index", "eval_auc") if k in row), None)
            score = f"{metric[5:]} {row[metric]:.3f}" if metric else ""
            loss = f"train loss {row['train_loss']:.3f} " if "train_loss" in row else ""
            progress.update(task, advance=1, description=f"round {row['round']}/{args.rounds} {loss}{score}")

        report = simulate(spec, on_round=on_round)
    console.print(f"report: {report}")
    print(report.read_text())
    return 0


def _cmd_site_start(args: argparse.Namespace) -> int:
    from fedfusion.client.daemon import start_site

    return start_site(args.config)


def _cmd_coordinator_start(args: argparse.Namespace) -> int:
    from fedfusion.server.coordinator import start_coordinator

    certs = None
    if not args.insecure:
        if not (args.ssl_ca_certfile and args.ssl_certfile and args.ssl_keyfile):
            print("error: TLS needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile "
                  "(or --insecure for local development only)", file=sys.stderr)
            return 2
        certs = (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)
    return start_coordinator(Path(args.state_dir), args.host, args.port, insecure=args.insecure, certificates=certs)


def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    import tomllib

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from fedfusion.server.coordinator import launch_run

    config: dict[str, object] = {"num-server-rounds": args.rounds, "min-sites": args.min_sites,
                                 "strategy": args.strategy, "fusion": args.fusion,
                                 "schema": str(Path(args.schema).resolve()),
                                 "run-dir": str(Path(args.run_dir).resolve()), "resume": args.resume}
    try:
        config.update(_parse_overrides(args.set))
        return launch_run(Path(args.state_dir), config, app_dir=Path(args.app_dir) if args.app_dir else None,
                          stream=not args.detach)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _cmd_status(args: argparse.Namespace) -> int:
    from fedfusion.server.coordinator import run_status

    return run_status(Path(args.state_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfusion",
                                     description="Federated multimodal learning across hospital sites.")
    sub = parser.add_subparsers(dest="command", required=True)

    site = sub.add_parser("site", help="hospital site commands").add_subparsers(dest="site_command", required=True)
    check = site.add_parser("check", help="validate a site manifest against the federation schema (local only)")
    check.add_argument("manifest", help="site manifest CSV")
    check.add_argument("--schema", required=True, help="federation schema JSON")
    check.add_argument("--no-images", action="store_true", help="do not open every image (faster)")
    check.add_argument("--allow-single-class", action="store_true",
                       help="accept a site whose training rows hold one class (simulated skew)")
    check.set_defaults(func=_cmd_site_check)
    start = site.add_parser("start", help="check the site's data, then run its Flower SuperNode")
    start.add_argument("config", help="site.toml")
    start.set_defaults(func=_cmd_site_start)

    coordinator = sub.add_parser("coordinator", help="coordinator commands").add_subparsers(
        dest="coordinator_command", required=True)
    cstart = coordinator.add_parser("start", help="run the Flower SuperLink with a persistent database")
    cstart.add_argument("--state-dir", default="coordinator", help="database + flwr connection live here")
    cstart.add_argument("--host", default="127.0.0.1")
    cstart.add_argument("--port", type=int, default=9092)
    cstart.add_argument("--insecure", action="store_true", help="NO TLS: local development only")
    cstart.add_argument("--ssl-ca-certfile")
    cstart.add_argument("--ssl-certfile")
    cstart.add_argument("--ssl-keyfile")
    cstart.set_defaults(func=_cmd_coordinator_start)

    run = sub.add_parser("run", help="launch a federated run on a started coordinator")
    run.add_argument("--state-dir", default="coordinator")
    run.add_argument("--schema", required=True, help="federation schema JSON (on the coordinator)")
    run.add_argument("--run-dir", default="runs/latest", help="checkpoints, metrics and report go here")
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--min-sites", type=int, default=2)
    run.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "fedadam"])
    run.add_argument("--fusion", default="attention")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any other run config key, e.g. --set local-epochs=3")
    run.add_argument("--app-dir", default=None, help="fedfusion source folder (default: the installed one)")
    run.add_argument("--detach", action="store_true", help="do not wait for the run to finish")
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser("status", help="list the coordinator's runs")
    status.add_argument("--state-dir", default="coordinator")
    status.set_defaults(func=_cmd_status)

    datasets = sub.add_parser("datasets", help="real data sets shipped in packages").add_subparsers(
        dest="datasets_command", required=True)
    datasets.add_parser("list", help="list the data sets").set_defaults(func=_cmd_datasets_list)
    build = datasets.add_parser("build", help="write a data set's manifest, schema and files to a folder")
    build.add_argument("name")
    build.add_argument("out")
    build.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    build.set_defaults(func=_cmd_datasets_build)

    local = sub.add_parser("train-local", help="pooled or single-site baseline training")
    local.add_argument("--manifest", required=True)
    local.add_argument("--schema", required=True)
    local.add_argument("--fusion", default="attention")
    local.add_argument("--backbone", default="cnn_small", help="image backbone (see common/models)")
    local.add_argument("--pretrained-path", default=None, help="local weights file for the image backbone")
    local.add_argument("--modalities", nargs="+", default=None, help="restrict to these modalities")
    local.add_argument("--site", default=None, help="train only on this site's rows (local-only baseline)")
    local.add_argument("--epochs", type=int, default=30)
    local.add_argument("--batch-size", type=int, default=64)
    local.add_argument("--lr", type=float, default=1e-3)
    local.add_argument("--patience", type=int, default=6)
    local.add_argument("--seed", type=int, default=0)
    local.add_argument("--resplit", action="store_true", help="draw a fresh seeded train/val/test split")
    local.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    local.add_argument("--out", default=None, help="folder for metrics.json, history.csv, model.pt, plots")
    local.set_defaults(func=_cmd_train_local)

    sim = sub.add_parser("simulate", help="split shipped real data into sites and run a simulated federation")
    sim.add_argument("--dataset", default="ovarian")
    sim.add_argument("--partition", default="natural", choices=["natural", "iid"])
    sim.add_argument("--num-sites", type=int, default=3, help="sites for --partition iid")
    sim.add_argument("--rounds", type=int, default=5)
    sim.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "fedadam"])
    sim.add_argument("--fusion", default="attention")
    sim.add_argument("--local-epochs", type=int, default=2)
    sim.add_argument("--batch-size", type=int, default=64)
    sim.add_argument("--lr", type=float, default=1e-3)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--no-baselines", action="store_true", help="skip pooled and local-only baselines")
    sim.add_argument("--baseline-epochs", type=int, default=30)
    sim.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    sim.add_argument("--gpus-per-site", type=float, default=0.0, help="GPU share per simulated site (Ray)")
    sim.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<partition>-<strategy>)")
    sim.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
