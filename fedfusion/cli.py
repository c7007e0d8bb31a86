"""The ``fedfusion`` command: a thin dispatcher at the top of the import graph (nothing imports it).

Each sub-command imports its implementation lazily so ``fedfusion --help`` and ``site check`` do
not pay for torch/Flower imports they do not need.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_site_check(args: argparse.Namespace) -> int:
    from fedfusion.client.site_check import check_site

    return check_site(Path(args.manifest), Path(args.schema), check_images=not args.no_images,
                      allow_single_class=args.allow_single_class)


def _cmd_site_init(args: argparse.Namespace) -> int:
    from fedfusion.client.site_init import SiteInitError, init_site

    def names(text: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in text.split(",") if n.strip())

    out = Path(args.out)
    try:
        proposal = init_site(Path(args.export), out, schema_path=Path(args.schema) if args.schema else None,
                             force=args.force, name=args.name, id_column=args.id, time=args.time, event=args.event,
                             label=args.label, categorical=names(args.categorical), drop=names(args.drop),
                             omics=names(args.omics), seed=args.seed)
    except SiteInitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    schema_path = Path(args.schema) if args.schema else out / "schema.json"
    print(f"proposed from {args.export} -- please confirm:")
    for line in proposal.lines():
        print(f"  {line}")
    print(f"wrote {out / 'manifest.csv'} and {schema_path}\n"
          f"next: fedfusion site check {out / 'manifest.csv'} --schema {schema_path}")
    return 0


def _cmd_datasets_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedfusion.simulations.datasets import list_datasets

    table = Table(title="real data sets that ship inside packages (nothing is downloaded)")
    table.add_column("name", no_wrap=True)  # what a user types: never folded, even on an 80-column terminal
    for column in ("task", "sites", "source", "licence", "description"):
        table.add_column(column, overflow="fold")
    for info in list_datasets():
        table.add_row(info.name, info.task, str(info.site_column or "-"), info.source, info.licence,
                      info.description)
    Console().print(table)
    return 0


def _cmd_datasets_build(args: argparse.Namespace) -> int:
    from fedfusion.common.progress import ProgressDisplay, report

    if args.partition is None and (args.num_sites is not None or args.run_dir is not None):
        print("error: --num-sites and --run-dir describe the site manifests of --partition; add --partition "
              "(e.g. --partition natural)", file=sys.stderr)
        return 2
    with ProgressDisplay("datasets build") as progress:
        report(progress, "loading the data set readers")  # importing pandas and the packages takes seconds
        from fedfusion.common.manifest import ManifestError
        from fedfusion.simulations.datasets import DatasetError, build_dataset

        try:
            if args.partition is not None:  # site manifests + the `flwr run` line (docs/flower-cli.md)
                from fedfusion.simulations.flwr_run import build_flwr_sites

                flwr_data = build_flwr_sites(args.name, args.out, args.partition, args.num_sites or 3, args.seed,
                                             run_dir=args.run_dir, on_step=progress)
            else:
                schema_path = build_dataset(args.name, Path(args.out), seed=args.seed, on_step=progress)
        except (DatasetError, ManifestError, ValueError) as err:  # ValueError: a PartitionError
            progress.stop()
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.partition is None:
        print(f"wrote {schema_path.parent / 'manifest.csv'} and {schema_path}")
        return 0
    sites = flwr_data.sites
    print(f"wrote {flwr_data.data_dir / 'manifest.csv'}, {flwr_data.schema} and {len(sites)} site manifests "
          f"(site-<name>.csv); partition-id 0..{len(sites) - 1} = {', '.join(sites)}")
    print("run it with Flower's CLI from the fedfusion folder (docs/flower-cli.md; CONNECTION as in "
          "$FLWR_HOME/config.toml):")
    print(f"  {flwr_data.command()}")
    return 0


def _cmd_datasets_export(args: argparse.Namespace) -> int:
    from fedfusion.simulations.datasets import DatasetError
    from fedfusion.simulations.export import export_sites

    try:
        written = export_sites(args.name, Path(args.out))
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for site, path in written.items():
        print(f"{site}: {path}")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    """List installed plug-ins (docs/plugins.md) and what each registered; 1 when one failed to load."""
    from fedfusion.common.models import list_fusions
    from fedfusion.common.plugins import GROUPS, load_all
    from fedfusion.simulations.datasets import list_datasets

    list_fusions()  # announces the model registries, then loads fedfusion.models (the data set one is announced)
    list_datasets()
    found = load_all()
    if args.json:
        print(json.dumps([{"group": p.group, "name": p.name, "value": p.value, "distribution": p.distribution,
                           "registered": {k: list(v) for k, v in p.registered.items()}, "error": p.error}
                          for p in found], indent=2))
    elif not found:
        print(f"no plug-ins installed (entry point groups: {', '.join(GROUPS)}; see docs/plugins.md)")
    for plugin in found:
        if args.json:
            break
        print(f"{plugin.group}: {plugin.name} = {plugin.value} ({plugin.distribution})")
        for kind, names in plugin.registered.items():
            print(f"  {kind}: {', '.join(names)}")
        if plugin.ok and not plugin.registered:
            print("  (registered nothing)")
        if not plugin.ok:
            print("  FAILED to load (see the warning)")
    for plugin in found:
        if plugin.error:
            print(f"warning: {plugin.error}", file=sys.stderr)
    return 0 if all(p.ok for p in found) else 1


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


def _missing_simulation_extra() -> str | None:
    """One line when Flower's Ray runtime or lifelines is absent (a site install), instead of Flower's exit
    box or a traceback minutes into the run; None when both are installed."""
    import importlib.util

    missing = []
    for module in ("ray", "lifelines"):
        try:
            spec = importlib.util.find_spec(module)
        except ImportError:
            spec = None
        if spec is None or spec.origin is None:  # origin None: a stray folder of that name, not the package
            missing.append(module)
    if not missing:
        return None
    return (f"simulations need {' and '.join(missing)}, which a site install leaves out; install them with: "
            'pip install "fedfusion[simulation]"')


def _cmd_simulate(args: argparse.Namespace) -> int:
    import logging

    from fedfusion.common.config import ConfigError
    from fedfusion.common.manifest import ManifestError
    from fedfusion.common.progress import ProgressDisplay, round_step
    from fedfusion.simulations.datasets import DatasetError
    from fedfusion.simulations.partition import PartitionError
    from fedfusion.simulations.simulate import SimulationSpec, federated_ended_early, simulate
    from fedfusion.simulations.user_sites import SitesDirError, find_sites

    if missing := _missing_simulation_extra():
        print(f"error: {missing}", file=sys.stderr)
        return 2
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler; do not print twice
    logging.getLogger("flwr").setLevel(logging.WARNING)  # its per-round INFO lines would bury the progress lines
    sites_dir = Path(args.sites_dir) if args.sites_dir else None
    if sites_dir is not None:
        try:
            find_sites(sites_dir)  # the folder layout, before anything is built
        except SitesDirError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    name = sites_dir.name if sites_dir is not None else args.dataset
    out = Path(args.out or f"runs/{name}-{args.partition}-{args.strategy}")
    spec = SimulationSpec(dataset=f"sites-dir {sites_dir}" if sites_dir else args.dataset, sites_dir=sites_dir,
                          out_dir=out, partition=args.partition, num_sites=args.num_sites,
                          rounds=args.rounds, strategy=args.strategy, fusion=args.fusion,
                          image_backbone=args.backbone,
                          local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          baselines=not args.no_baselines, baseline_epochs=args.baseline_epochs, device=args.device,
                          gpus_per_site=args.gpus_per_site, partition_options=_partition_options(args),
                          scale_sites=args.scale_sites, rows_per_site=args.rows_per_site,
                          fraction_train=args.fraction_train, fraction_evaluate=args.fraction_evaluate,
                          ray_address=args.ray_address, tracking=args.tracking, tracking_dir=args.tracking_dir,
                          mlflow_uri=args.mlflow_uri, personalize=args.personalize or "")
    # a bar on a terminal; plain lines (one per stage, round and baseline epoch) in logs and pipes
    with ProgressDisplay("simulate") as progress:
        try:
            report = simulate(spec, on_round=lambda row: progress(round_step(row, args.rounds)), on_step=progress)
        # the user's data or a split the data set cannot take (wdbc has no natural sites), before any training
        except (SitesDirError, ManifestError, ConfigError, DatasetError, PartitionError) as err:
            progress.stop()
            print(f"error: {err}", file=sys.stderr)
            return 2
        progress.message(f"report: {report}")
    print(report.read_text())
    ended = federated_ended_early(spec.out_dir)
    if ended:
        print(f"error: the federated run ended early: {ended}", file=sys.stderr)
        return 1
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console

    from fedfusion.common.progress import ProgressDisplay
    from fedfusion.simulations.datasets import DatasetError
    from fedfusion.simulations.experiment import StudyError, ended_early_lines, load_study, run_study, study_step

    if missing := _missing_simulation_extra():
        print(f"error: {missing}", file=sys.stderr)
        return 2
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower's per-round INFO lines would bury the progress bar
    try:
        study = load_study(args.study)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/study-{Path(args.study).stem}")
    console = Console(stderr=True)
    try:
        with ProgressDisplay("experiment", console.file) as progress:  # a bar on a terminal, else plain lines
            record = run_study(study, out, on_progress=lambda event: progress(study_step(event)))
    except (DatasetError, ValueError) as err:  # the data set cannot be built or split as the study asks
        print(f"error: {err}", file=sys.stderr)
        return 2
    console.print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    print((out / "report.md").read_text())
    for failure in record.failures:
        console.print(f"[red]failed[/]: seed {failure['seed']}, {failure['step']}: {failure['error']}")
    for line in ended_early_lines(record):  # a model of fewer rounds than the study asked for, as in simulate
        print(f"error: {line}", file=sys.stderr)
    return 1 if record.failures or record.ended_early else 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from fedfusion.common.progress import ProgressDisplay
    from fedfusion.simulations.explain import ExplainError, explain_run

    # permutation importance reports every feature: in a log, one line every 2 s is enough
    with ProgressDisplay("explain", min_interval=2.0) as progress:
        try:
            path = explain_run(Path(args.run_dir), Path(args.out) if args.out else None, n_cases=args.cases,
                               n_repeats=args.repeats, max_features=args.max_features, seed=args.seed,
                               device=args.device, on_step=progress)
        except ExplainError as err:
            progress.stop()
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(path.read_text())
    print(f"explanations: {path.parent}", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fedfusion.simulations.model_export import ExportError, export_run

    try:
        result = export_run(Path(args.run_dir), args.format, Path(args.out) if args.out else None, site=args.site,
                            manifest=Path(args.manifest) if args.manifest else None)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {result.path} (statistics of {result.site}) and {result.sidecar}")
    if result.rows_checked:
        print(f"checked on {result.rows_checked} test rows: max |exported - PyTorch| = {result.max_abs_diff:.2g}")
    return 0


def _partition_options(args: argparse.Namespace) -> dict:
    """Only the partition flags the user gave, so partition_manifest's documented defaults apply."""
    names = ("alpha", "skew_on", "size_law", "missing_modality", "missing_sites", "missing_fraction",
             "shift_feature", "shift_strictness", "min_site_rows", "allow_single_class")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _cmd_site_start(args: argparse.Namespace) -> int:
    from fedfusion.client.daemon import start_site

    return start_site(args.config)


def _cmd_site_audit(args: argparse.Namespace) -> int:
    from fedfusion.client.audit import audit_command

    return audit_command(args.config, run=args.run, server_round=args.round, as_json=args.json,
                         show_records=args.records)


def _cmd_site_dashboard(args: argparse.Namespace) -> int:
    from fedfusion.client.dashboard import run_dashboard

    return run_dashboard(args.config, host=args.host, port=args.port, token=args.token, refresh=args.refresh,
                         ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)


def _cmd_coordinator_dashboard(args: argparse.Namespace) -> int:
    from fedfusion.server.dashboard import run_dashboard

    return run_dashboard(args.runs_dir, state_dir=args.state_dir, host=args.host, port=args.port, token=args.token,
                         refresh=args.refresh, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)


def _add_dashboard_flags(parser: argparse.ArgumentParser, port: int) -> None:
    """Flags both read-only dashboards share (safety rules: fedfusion/common/dashboard.py)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; anything but loopback requires --token")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--token", default=None,
                        help="every request must carry it (?token=... or 'Authorization: Bearer ...'); "
                             "default: $FEDFUSION_DASHBOARD_TOKEN")
    parser.add_argument("--refresh", type=int, default=5, help="seconds between page reloads while a run is live")
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    parser.add_argument("--ssl-keyfile", default=None, help="private key of --ssl-certfile")


def _cmd_privacy_status(args: argparse.Namespace) -> int:
    from fedfusion.client.ledger import privacy_status

    return privacy_status(args.config, as_json=args.json)


def _cmd_coordinator_start(args: argparse.Namespace) -> int:
    from fedfusion.server.coordinator import CoordinatorError, adopt_kit_roster, resolve_certificates, start_coordinator
    from fedfusion.server.provision import ProvisionError, authorised_site_keys

    kit = Path(args.kit) if args.kit else None
    try:
        certs = resolve_certificates(insecure=args.insecure, kit=kit, ca=args.ssl_ca_certfile,
                                     cert=args.ssl_certfile, key=args.ssl_keyfile)
        node_auth = not (args.insecure or args.no_node_auth)
        if args.site_keys and not node_auth:
            raise CoordinatorError("--site-keys needs node authentication: drop --insecure / --no-node-auth")
        keys_from = Path(args.site_keys) if args.site_keys else (kit if kit is not None and node_auth else None)
        site_keys = authorised_site_keys(keys_from) if keys_from is not None else None
    except (CoordinatorError, ProvisionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if kit is not None and adopt_kit_roster(kit, Path(args.state_dir)) is not None:
        print(f"replies must be signed by the sites of {kit / 'roster.json'} (copied to {args.state_dir})",
              file=sys.stderr)
    return start_coordinator(Path(args.state_dir), args.host, args.port, insecure=args.insecure, certificates=certs,
                             node_auth=node_auth, site_keys=site_keys)


def _cmd_coordinator_register_sites(args: argparse.Namespace) -> int:
    from fedfusion.server.coordinator import CoordinatorError, register_sites
    from fedfusion.server.provision import ProvisionError, authorised_site_keys

    try:
        register_sites(Path(args.state_dir), authorised_site_keys(Path(args.keys)), timeout=args.timeout,
                       out=sys.stdout)
    except (CoordinatorError, ProvisionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_provision(args: argparse.Namespace) -> int:
    from fedfusion.client.approval import normalise_hashes
    from fedfusion.server.provision_cli import provision_command

    try:  # the same check a site's [approval] apps gets, so a kit never ships a hash its site refuses
        approved = sorted(normalise_hashes(args.approve_app, "--approve-app"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return provision_command(args, approved)


def _cmd_site_keygen(args: argparse.Namespace) -> int:
    from fedfusion.server.provision_cli import keygen_command

    return keygen_command(args.out, args.site_id, args.force)


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
    from fedfusion.server.coordinator import CoordinatorError, launch_run, state_roster

    config: dict[str, object] = {"num-server-rounds": args.rounds, "min-sites": args.min_sites,
                                 "strategy": args.strategy, "fusion": args.fusion,
                                 "schema": str(Path(args.schema).resolve()),
                                 "run-dir": str(Path(args.run_dir).resolve()), "resume": args.resume}
    roster = state_roster(Path(args.state_dir))  # from `coordinator start --kit`: replies must be signed
    if roster is not None:
        config["roster"] = str(roster)
    try:
        config.update(_parse_overrides(args.set))
        return launch_run(Path(args.state_dir), config, app_dir=Path(args.app_dir) if args.app_dir else None,
                          stream=not args.detach)
    except (CoordinatorError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _cmd_app_hash(args: argparse.Namespace) -> int:
    from fedfusion.client.approval import fab_hash
    from fedfusion.server.coordinator import default_app_dir

    app_dir = Path(args.app_dir) if args.app_dir else default_app_dir()
    print(fab_hash(app_dir))
    return 0


def _cmd_coordinator_stop(args: argparse.Namespace) -> int:
    from fedfusion.server.coordinator import CoordinatorError, stop_run

    try:
        return stop_run(Path(args.state_dir), args.run_id)
    except CoordinatorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _cmd_coordinator_sites(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedfusion.server.coordinator import list_nodes, site_contributions

    console = Console()
    try:
        nodes = list_nodes(Path(args.state_dir))
    except RuntimeError as err:  # CoordinatorError (no state) or an unreachable SuperLink
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = Table(title="SuperNodes known to the SuperLink")
    for column in ("node id", "status", "online since", "offline since"):
        table.add_column(column)
    for node in nodes:
        table.add_row(str(node.get("node-id")), str(node.get("status")), str(node.get("online-at") or ""),
                      str(node.get("offline-at") or ""))
    console.print(table)
    if args.run_dir:
        per_site = Table(title=f"contributions to {args.run_dir}")
        for column in ("site", "rounds trained", "rounds evaluated", "last round", "refusals"):
            per_site.add_column(column)
        for row in site_contributions(Path(args.run_dir)):
            per_site.add_row(row["site"], str(row["rounds_trained"]), str(row["rounds_evaluated"]),
                             str(row["last_round"]), str(row["refusals"]))
        console.print(per_site)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from fedfusion.server.coordinator import CoordinatorError, run_status

    try:
        return run_status(Path(args.state_dir))
    except CoordinatorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


_DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."


def version_text() -> str:
    """One line for bug reports: fedfusion, Flower, torch and Python versions, read from the installed
    metadata (importing torch or Flower to ask them would take seconds)."""
    import platform
    from importlib import metadata

    import fedfusion

    def installed(name: str, fallback: str = "not installed") -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return fallback

    return (f"fedfusion {installed('fedfusion', fedfusion.__version__)} (Flower {installed('flwr')}, "
            f"torch {installed('torch')}, Python {platform.python_version()})")


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked (argparse's own version action formats it at build time)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from fedfusion.cli_choices import OneLineParser  # one-line errors, "did you mean", defaults in help

    parser = OneLineParser(prog="fedfusion",
                                     description="Federated multimodal learning across hospital sites.")
    parser.add_argument("--version", action=_VersionAction, help="print the fedfusion, Flower, torch and Python "
                                                                 "versions and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    site = sub.add_parser("site", help="hospital site commands").add_subparsers(dest="site_command", required=True)
    check = site.add_parser("check", help="validate a site manifest against the federation schema (local only)")
    check.add_argument("manifest", help="site manifest CSV")
    check.add_argument("--schema", required=True, help="federation schema JSON")
    check.add_argument("--no-images", action="store_true", help="do not open every image (faster)")
    check.add_argument("--allow-single-class", action="store_true",
                       help="accept a site whose training rows hold one class (simulated skew)")
    check.set_defaults(func=_cmd_site_check)
    init = site.add_parser("init", help="propose a schema and write a manifest from a hospital's CSV export "
                                        "(prints its guesses to confirm)")
    init.add_argument("export", help="the hospital's CSV export (one row per patient)")
    init.add_argument("--out", required=True, help="folder for manifest.csv (one folder per site)")
    init.add_argument("--schema", default=None,
                      help="schema file to write, or to merge this site into when it exists (default OUT/schema.json)")
    init.add_argument("--name", default=None, help="schema name (default: the export's file name)")
    init.add_argument("--id", default=None, help="the patient id column")
    init.add_argument("--time", default=None, help="follow-up time column (survival)")
    init.add_argument("--event", default=None, help="event column, 0 = censored / 1 = event (survival)")
    init.add_argument("--label", default=None, help="outcome column (classification)")
    init.add_argument("--categorical", default="", help="comma-separated columns to treat as categories")
    init.add_argument("--drop", default="", help="comma-separated columns to leave out")
    init.add_argument("--omics", default="", help="comma-separated name patterns of omics columns, e.g. 'gene_*'")
    init.add_argument("--seed", type=int, default=0, help="seed of the stratified train/val/test split")
    init.add_argument("--force", action="store_true", help="replace an existing OUT/manifest.csv")
    init.set_defaults(func=_cmd_site_init)
    keygen = site.add_parser("keygen", help="make this site's own key pair (site.key stays here; send only "
                                            "site.pub to the coordinator)")
    keygen.add_argument("--out", required=True, help="folder for site.key (0600) and site.pub")
    keygen.add_argument("--site-id", default=None, help="this site's id, written as the public key's comment")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair (re-register it after)")
    keygen.set_defaults(func=_cmd_site_keygen)
    start = site.add_parser("start", help="check the site's data, then run its Flower SuperNode")
    start.add_argument("config", help="site.toml")
    start.set_defaults(func=_cmd_site_start)
    audit = site.add_parser("audit", help="summarise the site's audit log: what left the site, per run and round")
    audit.add_argument("config", help="site.toml (the log is [site] audit-log, default audit.jsonl beside it)")
    audit.add_argument("--run", default=None, help="only this run id")
    audit.add_argument("--round", type=int, default=None, help="only this round")
    audit.add_argument("--json", action="store_true", help="print the summary as JSON")
    audit.add_argument("--records", action="store_true", help="print the matching audit lines instead")
    audit.set_defaults(func=_cmd_site_audit)
    sdash = site.add_parser("dashboard", help="read-only local web page: health, manifest summary, audit log, "
                                              "privacy ledger, last rounds")
    sdash.add_argument("config", help="site.toml")
    _add_dashboard_flags(sdash, port=8051)
    sdash.set_defaults(func=_cmd_site_dashboard)

    privacy = sub.add_parser("privacy", help="the site's differential-privacy budget").add_subparsers(
        dest="privacy_command", required=True)
    pstatus = privacy.add_parser("status", help="each study's ε spent and remaining at this site (from its ledger)")
    pstatus.add_argument("config", help="site.toml (policy in [privacy]; ledger beside it unless [privacy] ledger)")
    pstatus.add_argument("--json", action="store_true", help="print the status as JSON")
    pstatus.set_defaults(func=_cmd_privacy_status)

    coordinator = sub.add_parser("coordinator", help="coordinator commands").add_subparsers(
        dest="coordinator_command", required=True)
    cstart = coordinator.add_parser("start", help="run the Flower SuperLink with a persistent database")
    cstart.add_argument("--state-dir", default="coordinator", help="database + flwr connection live here")
    cstart.add_argument("--host", default="127.0.0.1")
    cstart.add_argument("--port", type=int, default=9092)
    cstart.add_argument("--kit", default=None,
                        help="coordinator kit from 'fedfusion provision' (ca.pem, server.pem, server.key, "
                             "sites/*.pub): TLS + node authentication; its site keys are registered at start")
    cstart.add_argument("--ssl-ca-certfile", help="CA certificate (overrides the kit's ca.pem)")
    cstart.add_argument("--ssl-certfile", help="SuperLink certificate (overrides the kit's server.pem)")
    cstart.add_argument("--ssl-keyfile", help="SuperLink private key (overrides the kit's server.key)")
    cstart.add_argument("--site-keys", default=None,
                        help="site public keys to register: a kit, a folder of SITE.pub files or one .pub "
                             "(default: the kit's sites/)")
    cstart.add_argument("--no-node-auth", action="store_true",
                        help="TLS without SuperNode authentication: any SuperNode reaching the port may join")
    cstart.add_argument("--insecure", action="store_true",
                        help="NO TLS and NO node authentication: local development only, never with patient data")
    cstart.set_defaults(func=_cmd_coordinator_start)
    creg = coordinator.add_parser("register-sites",
                                  help="register site public keys with the running SuperLink (node authentication)")
    creg.add_argument("keys", help="a coordinator kit (its sites/*.pub), a folder of SITE.pub files or one SITE.pub")
    creg.add_argument("--state-dir", default="coordinator", help="the coordinator's --state-dir")
    creg.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the SuperLink per key")
    creg.set_defaults(func=_cmd_coordinator_register_sites)
    cstop = coordinator.add_parser("stop", help="stop a run (its checkpoints stay: `fedfusion run --resume` goes on)")
    cstop.add_argument("run_id", type=int, help="the run id `fedfusion status` lists")
    cstop.add_argument("--state-dir", default="coordinator")
    cstop.set_defaults(func=_cmd_coordinator_stop)
    csites = coordinator.add_parser("sites", help="which sites are online, last seen, and (with --run-dir) the "
                                                  "rounds each contributed and refused")
    csites.add_argument("--state-dir", default="coordinator")
    csites.add_argument("--run-dir", default=None, help="a run folder (metrics + refusals) to summarise per site")
    csites.set_defaults(func=_cmd_coordinator_sites)
    cdash = coordinator.add_parser("dashboard", help="read-only web page over the run folders: progress, sites, "
                                                     "metric curves, ε per site, model and report downloads")
    cdash.add_argument("--runs-dir", required=True, help="folder holding the run folders (each run's --run-dir)")
    cdash.add_argument("--state-dir", default="coordinator", help="the coordinator's --state-dir (for 'flwr ls')")
    _add_dashboard_flags(cdash, port=8050)
    cdash.set_defaults(func=_cmd_coordinator_dashboard)

    prov = sub.add_parser("provision", help="create the federation CA, SuperLink certificate and one kit per site")
    prov.add_argument("--sites", default=None,
                      help="comma-separated site ids, e.g. st-marys,charite,ucl (default with --site-keys: "
                           "every SITE.pub there)")
    prov.add_argument("--superlink-host", required=True, action="append", metavar="HOST",
                      help="DNS name or IP address sites use to reach the coordinator (repeat for more; "
                           "localhost/127.0.0.1/::1 are always added). The first one goes into site.toml")
    prov.add_argument("--out", required=True, help="folder for the kits (must not exist or be empty)")
    prov.add_argument("--port", type=int, default=9092, help="the SuperLink port written into site.toml")
    prov.add_argument("--days", type=int, default=825, help="validity of the SuperLink certificate (CA: >= 10 years)")
    prov.add_argument("--schema", default=None, help="the study's schema.json, copied into every kit")
    prov.add_argument("--add", action="store_true", help="add these sites to the existing kits in --out")
    prov.add_argument("--force", action="store_true", help="replace existing kits (their old keys stop working)")
    prov.add_argument("--approve-app", action="append", default=[], metavar="SHA256",
                      help="app bundle hash (from `fedfusion app-hash`) for every site's [approval] apps; repeat "
                           "for more. None: sites refuse every bundle until they add one")
    prov.add_argument("--site-keys", default=None, metavar="DIR",
                      help="folder of SITE.pub files the sites made with `fedfusion site keygen` (recommended): "
                           "their kits hold no private key")
    prov.set_defaults(func=_cmd_provision)

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

    app_hash = sub.add_parser("app-hash", help="SHA-256 of the app bundle `fedfusion run` sends: what sites approve "
                                               "in site.toml [approval] apps")
    app_hash.add_argument("--app-dir", default=None, help="fedfusion source folder (default: the installed one)")
    app_hash.set_defaults(func=_cmd_app_hash)

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
    build.add_argument("--partition", default=None, choices=["natural", "iid", "dirichlet", "quantity",
                                                             "modality-missing"],
                       help="also write one manifest per site for `flwr run .` and print its --run-config "
                            "(natural = the data's real sites; docs/flower-cli.md)")
    build.add_argument("--num-sites", type=int, default=None,
                       help="with a simulated --partition: how many sites (default 3)")
    build.add_argument("--run-dir", default=None,
                       help="with --partition: the run folder the printed config names (default runs/flwr-NAME)")
    build.set_defaults(func=_cmd_datasets_build)
    export = datasets.add_parser("export", help="write one plain CSV per natural site, as a hospital's export looks "
                                                "(no split column): input for `site init`")
    export.add_argument("name", help="a data set with real sites (ovarian, breast-cohorts, lung)")
    export.add_argument("--out", required=True, help="folder for <site>.csv files")
    export.set_defaults(func=_cmd_datasets_export)

    plugins = sub.add_parser("plugins", help="installed plug-ins (fedfusion.models / fedfusion.datasets entry "
                                             "points) and what each registered; exit 1 if one failed to load")
    plugins.add_argument("--json", action="store_true", help="one JSON list instead of text")
    plugins.set_defaults(func=_cmd_plugins)

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
    local.add_argument("--device", default="auto", help=_DEVICE_HELP)
    local.add_argument("--out", default=None, help="folder for metrics.json, history.csv, model.pt, plots")
    local.set_defaults(func=_cmd_train_local)

    sim = sub.add_parser("simulate", help="split shipped real data into sites and run a simulated federation")
    sim.add_argument("--dataset", default="ovarian", help="a shipped data set (`fedfusion datasets list`)")
    sim.add_argument("--sites-dir", default=None,
                     help="your own data instead: DIR/schema.json + DIR/<site>/manifest.csv (docs/schema.md)")
    sim.add_argument("--partition", default="natural", choices=["natural", "iid", "dirichlet", "quantity",
                                                                 "covariate-shift", "modality-missing"],
                     help="natural = the data's real sites; the others are SIMULATED (simulations/partition.py)")
    sim.add_argument("--num-sites", type=int, default=3, help="sites for a simulated partition")
    sim.add_argument("--alpha", type=float, default=None,
                     help="Dirichlet concentration: label skew (dirichlet, default 0.5) or sizes (quantity, 1.0)")
    sim.add_argument("--skew-on", default=None, choices=["label", "event", "time"],
                     help="dirichlet target (survival: event indicator or follow-up-time quartile)")
    sim.add_argument("--size-law", default=None, choices=["dirichlet", "power"], help="quantity: site sizes")
    sim.add_argument("--missing-modality", default=None, choices=["image", "clinical", "omics"],
                     help="blank this modality at --missing-sites whole sites and --missing-fraction elsewhere")
    sim.add_argument("--missing-sites", type=int, default=None,
                     help="sites that lack the modality entirely (default 1 for modality-missing, else 0)")
    sim.add_argument("--missing-fraction", type=float, default=None, help="share of rows per other site losing it")
    sim.add_argument("--shift-feature", default=None, help="covariate-shift: clinical/omics column sites differ in")
    sim.add_argument("--shift-strictness", type=float, default=None, help="covariate-shift: 0 = iid .. 1 = sorted")
    sim.add_argument("--min-site-rows", type=int, default=None, help="smallest usable site (default 10)")
    sim.add_argument("--allow-single-class", action="store_true", default=None,
                     help="accept simulated sites whose training rows hold one class (untruncated label skew)")
    sim.add_argument("--rounds", type=int, default=5)
    sim.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "fedadam"])
    sim.add_argument("--personalize", default=None, choices=["ft", "fedper", "ditto"],
                     help="ft: each site also scores a fine-tuned copy of the last round's model; fedper: private "
                          "heads kept at the sites; ditto: each site also trains its own model pulled toward the "
                          "global one (λ 0.1) (docs/experiments.md, Personalisation)")
    sim.add_argument("--fusion", default="attention")
    sim.add_argument("--backbone", default="cnn_small",
                     help="image backbone: a registered name (plug-ins too, `fedfusion plugins`) or timm:<model>")
    sim.add_argument("--local-epochs", type=int, default=2)
    sim.add_argument("--batch-size", type=int, default=64)
    sim.add_argument("--lr", type=float, default=1e-3)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--no-baselines", action="store_true", help="skip pooled and local-only baselines")
    sim.add_argument("--baseline-epochs", type=int, default=30)
    sim.add_argument("--device", default="auto", help=_DEVICE_HELP)
    sim.add_argument("--gpus-per-site", type=float, default=0.0, help="GPU share per simulated site (Ray)")
    sim.add_argument("--scale-sites", type=int, default=0,
                     help="> 0: this many VIRTUAL sites, each drawing --rows-per-site real rows on demand "
                          "(with replacement across sites; no baselines); see simulations/scale_sites.py")
    sim.add_argument("--rows-per-site", type=int, default=50, help="scale mode: distinct real rows per site")
    sim.add_argument("--fraction-train", type=float, default=1.0, help="share of sites sampled to train per round")
    sim.add_argument("--fraction-evaluate", type=float, default=1.0,
                     help="share of sites sampled to evaluate per round")
    sim.add_argument("--ray-address", default="",
                     help="run on an existing Ray cluster (HOST:6379 or auto; default: $RAY_ADDRESS, else a private "
                          "local Ray); see docs/ray-cluster.md")
    sim.add_argument("--tracking", default="", help="log rounds and sites to tensorboard, mlflow or "
                     "tensorboard,mlflow (the tracking extra; docs/tracking.md)")
    sim.add_argument("--tracking-dir", default="", help="parent of tensorboard/ and mlruns/ (default: <out>/federated)")
    sim.add_argument("--mlflow-uri", default="", help="MLflow server or database URI (default: a local file store)")
    sim.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<partition>-<strategy>)")
    sim.set_defaults(func=_cmd_simulate)

    exp = sub.add_parser("experiment", help="run a multi-seed study from a TOML file (docs/experiments.md)")
    exp.add_argument("study", help="study TOML file (see docs/examples/study-*.toml)")
    exp.add_argument("--out", default=None, help="output folder (default runs/study-<file name>)")
    exp.set_defaults(func=_cmd_experiment)

    explain = sub.add_parser("explain", help="modality weights, Grad-CAM and permutation importance of a run's model")
    explain.add_argument("run_dir", help="a simulate run folder or an experiment's runs/seed-N/<method> folder")
    explain.add_argument("--out", default=None, help="output folder (default RUN_DIR/explain)")
    explain.add_argument("--cases", type=int, default=3, help="Grad-CAM test cases per site")
    explain.add_argument("--repeats", type=int, default=5, help="shuffles per feature for permutation importance")
    explain.add_argument("--max-features", type=int, default=200, help="most omics features to permute")
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument("--device", default="auto", help=_DEVICE_HELP)
    explain.set_defaults(func=_cmd_explain)

    model_export = sub.add_parser("export", help="a run's model as one ONNX or TorchScript file with a site's "
                                                 "preprocessing (docs/export.md)")
    model_export.add_argument("run_dir", help="a folder with model.pt (simulate output, run folder, train-local --out)")
    model_export.add_argument("--format", default="onnx", choices=["onnx", "torchscript"],
                              help="onnx needs the export extra (pip install 'fedfusion[export]')")
    model_export.add_argument("--out", default=None,
                              help="file to write (default: export/model-<site>.onnx or .torchscript.pt by model.pt)")
    model_export.add_argument("--site", default=None,
                              help="a site of the run whose training-row statistics to embed (simulated runs)")
    model_export.add_argument("--manifest", default=None,
                              help="a site's manifest CSV: embed its training-row statistics (at a hospital)")
    model_export.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before anything imports Flower (it reads this at import): no usage telemetry leaves a hospital.
    from fedfusion.common.flower_tools import NO_TELEMETRY

    for key, value in NO_TELEMETRY.items():
        os.environ.setdefault(key, value)
    from fedfusion.cli_choices import exit_on_bad_choice

    args = build_parser().parse_args(argv)
    exit_on_bad_choice(args)  # --dataset/--fusion/--backbone against the registries, before any work starts
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
