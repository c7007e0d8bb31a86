"""The Flower 1.41 internals a site's ClientApp task process hooks, named in one place.

Why one module: code approval (``fedfusion.client.approval``) must sit between the FAB a task receives
and the code Flower imports from it, and Flower offers no public hook there. Its task body,
``flwr.supernode.runtime.run_clientapp.run_clientapp``, does::

    message, context, run, fab = pull_task_input(client)
    install_from_fab(fab.content, skip_prompt=True)         # unpacks to apps/<pub>.<name>.<ver>.<hash[:8]>
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    client_app = load(run.fab_id, run.fab_version, fab.hash_str)   # imports from that same 8-hex folder

so this module replaces the two names ``install_from_fab`` and ``get_load_client_app_fn`` *as that module
sees them* (nothing else in Flower changes). ``tests/unit/client/test_flower_runtime.py`` is the canary:
it fails if Flower renames either name, changes their call order, or changes the folder naming, so an
upgrade cannot silently bypass approval.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

# The module whose globals we replace; the names below must exist there (checked by the canary test).
RUN_CLIENTAPP_MODULE = "flwr.supernode.runtime.run_clientapp"
INSTALL_NAME = "install_from_fab"
LOADER_FACTORY_NAME = "get_load_client_app_fn"

Installer = Callable[..., Path]
LoaderFactory = Callable[..., Callable[[str, str, str], Any]]


def run_clientapp_module() -> ModuleType:
    """Flower's ClientApp task module (imported on demand: the site daemon itself never needs it)."""
    return importlib.import_module(RUN_CLIENTAPP_MODULE)


def flower_loader_factory() -> LoaderFactory:
    """Flower's own ``get_load_client_app_fn`` (the original, even after :func:`replace_fab_install_and_load`)."""
    from flwr.clientapp.utils import get_load_client_app_fn

    return get_load_client_app_fn


def load_client_app_from(app_dir: Path, fab_id: str, fab_version: str, fab_hash: str) -> Any:
    """Import the ClientApp of the project unpacked at ``app_dir`` with Flower's loader.

    Flower's loader, given an explicit app directory, refuses a project whose pyproject names another
    fab id or version than the run's, and never consults its own 8-hex ``apps/`` folder.
    """
    load = flower_loader_factory()(default_app_ref="", app_path=str(app_dir), multi_app=True)
    return load(fab_id, fab_version, fab_hash)


def fab_metadata(pyproject: dict[str, Any]) -> tuple[str, str]:
    """(fab id, fab version) exactly as Flower derives them from a project's pyproject.toml."""
    from flwr.common.config import get_metadata_from_config

    fab_id, version = get_metadata_from_config(pyproject)
    return str(fab_id), str(version)


def flower_app_folder(fab_id: str, fab_version: str, fab_hash: str) -> Path:
    """The folder Flower itself would unpack to and import from (named by only 8 hex digits of the hash)."""
    from flwr.common.config import get_project_dir

    return Path(get_project_dir(fab_id, fab_version, fab_hash))


def flower_home() -> Path:
    """``$FLWR_HOME`` as Flower resolves it (default ``~/.flwr``)."""
    from flwr.common.config import get_flwr_home

    return Path(get_flwr_home())


def replace_fab_install_and_load(install: Installer, loader_factory: LoaderFactory) -> None:
    """Make this process's ClientApp task call ``install`` / ``loader_factory`` instead of Flower's.

    Call in the task process (the warm executor's forked child) before ``run_clientapp`` runs.
    """
    module = run_clientapp_module()
    for name in (INSTALL_NAME, LOADER_FACTORY_NAME):
        if not hasattr(module, name):
            raise RuntimeError(f"{RUN_CLIENTAPP_MODULE}.{name} is missing: this Flower version is not supported by "
                               "fedfusion's code approval; install flwr 1.41.x")
    setattr(module, INSTALL_NAME, install)
    setattr(module, LOADER_FACTORY_NAME, loader_factory)
