"""Plug-ins: other distributions add encoders, fusions, heads and data sets through entry points.

A user's package declares, in its ``pyproject.toml``::

    [project.entry-points."fedfusion.models"]
    my_models = "my_package.models"          # a module whose decorators register into our registries

    [project.entry-points."fedfusion.datasets"]
    my_data = "my_package.data"

Loading an entry point only imports the module: its ``@register_image_backbone`` / ``@register_fusion``
/ ``@register_head`` decorators and ``register_dataset`` calls do the registering, exactly as our own
modules do (docs/plugins.md). Each group is loaded once per process, lazily, by the code that resolves
names: the model registry's look-ups (so ``create_model`` in the ServerApp, in every ClientApp process
and in simulation workers sees plug-ins without any start-up hook) and the data set registry's. Nothing
here runs at import time, so ``fedfusion --help`` and ``site check`` never import a plug-in.

A plug-in that fails to import (missing dependency, syntax error, a name someone already registered)
must not break unrelated commands: the failure is kept as one line naming the entry point and its
distribution, shown by ``fedfusion plugins`` and appended to the "unknown name" error of the registry
that was asked for a name it does not hold (the name the broken plug-in would have registered).

What each plug-in registered is found by comparing the registries' names before and after its import;
registries announce themselves with :func:`track` (``common/models/registry.py``,
``simulations/datasets.py``), which keeps this module free of imports from the layers above it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata

MODELS_GROUP = "fedfusion.models"
DATASETS_GROUP = "fedfusion.datasets"
GROUPS = (MODELS_GROUP, DATASETS_GROUP)


@dataclass(frozen=True)
class Plugin:
    """One entry point after loading: where it came from, what it added, or why it failed (one line)."""

    group: str
    name: str  # the entry point's name
    value: str  # "module" or "module:attribute"
    distribution: str  # "name version", or "unknown distribution"
    registered: dict[str, tuple[str, ...]] = field(default_factory=dict)  # kind -> names, e.g. "image backbone"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


_LOCK = threading.RLock()
_LISTERS: dict[str, Callable[[], Iterable[str]]] = {}  # kind -> the names that registry holds now
_BASELINE: dict[str, frozenset[str]] = {}  # kind -> its names when it announced itself
_LOADED: dict[str, list[Plugin]] = {}  # group -> its plug-ins, once loaded in this process
_LOADING: set[str] = set()  # groups being loaded (a plug-in that lists a registry while importing)


def track(kind: str, lister: Callable[[], Iterable[str]]) -> None:
    """A registry announces itself so that plug-in loads can report what they added to it.

    Call it after the registry's built-in names exist; those count as the baseline when the registry
    first appears in the middle of a plug-in load (a models plug-in importing our data set module).
    """
    with _LOCK:
        _LISTERS[kind] = lister
        _BASELINE[kind] = frozenset(lister())


def _snapshot() -> dict[str, frozenset[str]]:
    return {kind: frozenset(lister()) for kind, lister in _LISTERS.items()}


def _distribution(entry_point: metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "unknown distribution"
    return f"{dist.metadata['Name'] or dist.name} {dist.version}"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text}"


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    """The group's entry points, one per (name, value): a distribution found twice on sys.path (an
    editable install plus a copy in PYTHONPATH) lists the same entry point twice."""
    seen: dict[tuple[str, str], metadata.EntryPoint] = {}
    for entry_point in metadata.entry_points(group=group):
        seen.setdefault((entry_point.name, entry_point.value), entry_point)
    return sorted(seen.values(), key=lambda ep: ep.name)


def _load_one(group: str, entry_point: metadata.EntryPoint) -> Plugin:
    before = _snapshot()
    error = None
    try:
        entry_point.load()
    except Exception as err:  # a plug-in's own bug must not take down unrelated commands
        error = (f"plug-in '{entry_point.name}' ({group} entry point '{entry_point.value}' from "
                 f"{_distribution(entry_point)}) failed to load: {_one_line(err)}")
    after = _snapshot()
    added = {kind: tuple(sorted(names - before.get(kind, _BASELINE.get(kind, frozenset()))))
             for kind, names in after.items()}
    return Plugin(group, entry_point.name, entry_point.value, _distribution(entry_point),
                  {kind: names for kind, names in sorted(added.items()) if names}, error)


def load_plugins(group: str) -> list[Plugin]:
    """Import every entry point of ``group`` once per process and return what each did.

    Safe to call from every name look-up: after the first call it only returns the cached list. A call
    made while the group is loading (a plug-in listing a registry at import) returns what is loaded so
    far instead of recursing.
    """
    if group not in GROUPS:
        raise ValueError(f"unknown plug-in group {group!r}; expected one of {GROUPS}")
    with _LOCK:
        if group in _LOADED:
            return list(_LOADED[group])
        if group in _LOADING:
            return []
        _LOADING.add(group)
        try:
            plugins = [_load_one(group, entry_point) for entry_point in _entry_points(group)]
        finally:
            _LOADING.discard(group)
        _LOADED[group] = plugins
        return list(plugins)


def load_all() -> list[Plugin]:
    """Every group's plug-ins (``fedfusion plugins``)."""
    return [plugin for group in GROUPS for plugin in load_plugins(group)]


def failures(group: str) -> list[str]:
    """One line per plug-in of ``group`` that failed to load (loading the group if needed)."""
    return [plugin.error for plugin in load_plugins(group) if plugin.error]


def failure_note(group: str) -> str:
    """Text to append to an "unknown name" error: the name may belong to a plug-in that failed to load."""
    lines = failures(group)
    if not lines:
        return ""
    return "; note: " + "; ".join(lines)


def _forget() -> None:
    """Forget which groups were loaded (tests that install entry points in-process); registrations stay."""
    with _LOCK:
        _LOADED.clear()
