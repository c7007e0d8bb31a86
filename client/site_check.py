"""``fedfusion site check``: validate a site's manifest locally and print what a coordinator may see.

Nothing leaves the machine: the summary holds counts and coverage fractions, never values.
Every problem is printed at once (not just the first), and the exit code is 2 on any problem so
scripts and the site daemon's preflight can stop before a run starts.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedfusion.common.config import ConfigError, load_schema
from fedfusion.common.manifest import ManifestError, load_manifest

EXIT_OK = 0
EXIT_INVALID = 2


def check_site(manifest_path: Path, schema_path: Path, *, check_images: bool = True,
               allow_single_class: bool = False, console: Console | None = None) -> int:
    """Validate and print a summary; return the process exit code."""
    console = console or Console()
    try:
        schema = load_schema(schema_path)
        manifest = load_manifest(manifest_path, schema, check_images=check_images,
                                 allow_single_class=allow_single_class)
    except ConfigError as err:
        console.print(f"[bold red]schema error:[/] {err}", highlight=False, soft_wrap=True)
        return EXIT_INVALID
    except ManifestError as err:
        console.print(f"[bold red]{len(err.issues)} problem(s)[/] in {manifest_path}:", highlight=False, soft_wrap=True)
        for issue in err.issues:
            console.print(f"  - {issue}", highlight=False, soft_wrap=True)
        return EXIT_INVALID
    summary = manifest.summary()
    table = Table(title=f"site manifest OK: {manifest_path}", show_header=False)
    table.add_row("schema", f"{schema.name} ({schema.task})")
    table.add_row("rows", str(summary["rows"]))
    table.add_row("splits", ", ".join(f"{k}={v}" for k, v in summary["splits"].items()))
    if "labels" in summary:
        table.add_row("labels", ", ".join(f"{k}={v}" for k, v in summary["labels"].items()))
    if "events" in summary:
        table.add_row("events", f"{summary['events']} (median follow-up {summary['median_time']:.1f})")
    table.add_row("modality coverage", ", ".join(f"{k} {v:.0%}" for k, v in summary["modality_coverage"].items()))
    console.print(table)
    console.print(f"split: {manifest.split_note}", highlight=False, soft_wrap=True)
    for warning in manifest.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    return EXIT_OK
