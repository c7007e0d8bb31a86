"""One way to show progress of a long step: a rich bar on a terminal, plain lines everywhere else.

Why two renderings: on a terminal a live bar is the least noise, but in a CI log, a ``nohup`` file
or a pipe the same bar becomes hundreds of ANSI redraws (or nothing at all until the end). Work
code reports :class:`Step` events through a plain callback (``on_step``) and never decides how
they are shown; the command line owns one :class:`ProgressDisplay` that renders them.

Plain lines look like ``simulate: baseline local-only site 2 epoch 3/30 loss 0.412``: one per
event, in order, flushed at once, so a log shows what is running now and how far it got.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class Step:
    """One progress event: which stage runs (``"baseline pooled"``), how far (``done``/``total`` in
    the stage's own unit: rounds, epochs, features) and a short detail (loss, metric, ε)."""

    stage: str
    done: int | None = None
    total: int | None = None
    unit: str = ""
    detail: str = ""

    def text(self) -> str:
        """The event as one line without the command's prefix: ``stage [unit] done/total detail``."""
        parts = [self.stage]
        if self.done is not None:
            count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
            parts.append(f"{self.unit} {count}" if self.unit else count)
        if self.detail:
            parts.append(self.detail)
        return " ".join(parts)


StepCallback = Callable[[Step], None]


def report(on_step: StepCallback | None, stage: str, done: int | None = None, total: int | None = None, *,
           unit: str = "", detail: str = "") -> None:
    """Send one :class:`Step` to ``on_step`` if there is one (work code calls this, never prints)."""
    if on_step is not None:
        on_step(Step(stage, done, total, unit, detail))


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (a bar) rather than a file or pipe (plain lines)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


class ProgressDisplay:
    """Renders :class:`Step` events for one command: a rich bar when ``stream`` is a terminal, else
    one plain line per event prefixed with ``title``. Use as a context manager and pass the object
    itself as the ``on_step`` callback."""

    def __init__(self, title: str, stream: TextIO | None = None, *, plain: bool | None = None,
                 min_interval: float = 0.0) -> None:
        """``min_interval`` (seconds) thins plain lines of fast stages (a feature every 0.2 s): within
        one stage an update prints only that long after the previous line; a stage's first and last
        (``done == total``) events always print."""
        self.title = title
        self.min_interval = min_interval
        self._last_line = 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.plain = (not is_terminal(self.stream)) if plain is None else plain
        self._progress: Any = None
        self._task: Any = None
        self._stage: str | None = None

    def __enter__(self) -> ProgressDisplay:
        if not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn(f"[bold]{self.title}[/]"), BarColumn(),
                                      TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=Console(file=self.stream))
            self._progress.__enter__()
            self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """End the bar (idempotent), so an error message printed next is not overwritten."""
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None

    def __call__(self, step: Step) -> None:
        new_stage = step.stage != self._stage
        self._stage = step.stage
        if self.plain or self._progress is None:
            now = time.monotonic()
            last = step.total is not None and step.done == step.total
            if new_stage or last or now - self._last_line >= self.min_interval:
                self._last_line = now
                print(f"{self.title}: {step.text()}", file=self.stream, flush=True)
            return
        if new_stage:  # a new stage restarts the bar with its own total
            self._progress.reset(self._task, total=step.total)
        self._progress.update(self._task, completed=step.done or 0, total=step.total, description=step.text())

    def message(self, text: str) -> None:
        """A line that must stay visible (a warning, the report's path), above a live bar."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)


def round_step(row: dict[str, Any], rounds: int) -> Step:
    """A federated round's metrics row (``server.federation``) as a ``federation round k/N`` step:
    train loss, the global test and validation metric, ε (sample-level DP) and sites, where known."""
    parts = []
    if "train_loss" in row:
        parts.append(f"train loss {row['train_loss']:.3f}")
    metric = next((k[5:] for k in ("eval_c_index", "eval_auc") if k in row), None)
    if metric is not None:
        parts.append(f"{metric} {row[f'eval_{metric}']:.3f}")
        if f"eval_val_{metric}" in row:
            parts.append(f"val {metric} {row[f'eval_val_{metric}']:.3f}")
    if "train_epsilon" in row:
        parts.append(f"ε {row['train_epsilon']:.3f}")
    if "sites_trained" in row:
        refused = int(row.get("sites_refused", 0) or 0)
        parts.append(f"sites {int(row['sites_trained'])}" + (f" ({refused} refused)" if refused else ""))
    return Step("federation", int(row["round"]), rounds, "round", " ".join(parts))
