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

It is also the site side of the Flower adapter (the shared side, with the version check, is
:mod:`fedfusion.common.flower_adapter`): every other internal the site runtime uses or replaces lives
here, each with a canary in ``tests/unit/test_flower_canaries.py``:

- the warm SuperExec (:mod:`fedfusion.client.warm_executor`): Flower's ``Executor`` types, the
  ``get_executor`` seam of ``run_superexec``, ``run_clientapp``, its object-pull backoff and its
  ``pull_task_input`` (watched, to install and import the app while the message arrives);
- the SuperNode runner (:mod:`fedfusion.client.supernode_runner`): the ``time`` module that
  ``flwr.supernode.start_client_internal`` idles with, its object-pull backoff, and the ``flower-supernode``
  entry point;
- code approval: Flower's deterministic FAB build;
- releases kept before this adapter existed (Flower's serialized object tree), read once for upgrade.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

# The module whose globals we replace; the names below must exist there (checked by the canary test).
RUN_CLIENTAPP_MODULE = "flwr.supernode.runtime.run_clientapp"
INSTALL_NAME = "install_from_fab"
LOADER_FACTORY_NAME = "get_load_client_app_fn"

# The SuperExec module whose ``get_executor`` we replace (the module, not the function the package re-exports).
RUN_SUPEREXEC_MODULE = "flwr.supercore.superexec.run_superexec"
EXECUTOR_FACTORY_NAME = "get_executor"
OBJECT_PULL_NAME = "pull_and_inflate_object_from_tree"
# The task body's first step (task input, then the message), and the serde names that read its response.
PULL_TASK_INPUT_NAME = "pull_task_input"
# The SuperNode loop module whose view of ``time`` we replace.
SUPERNODE_LOOP_MODULE = "flwr.supernode.start_client_internal"

#: Re-exported for :mod:`fedfusion.client.warm_executor` (Flower's Executor interface types).
__all__ = ["ExecutionSpec", "LaunchResult", "TaskType"]

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


def forget_installed_fedfusion() -> list[str]:
    """Drop every ``fedfusion`` module from ``sys.modules``; return their names.

    Why: a warm task process is forked from a parent that imported ``fedfusion`` (the executor itself) from
    the site's installed copy. Flower's loader puts the run's unpacked bundle first on ``sys.path`` and
    imports ``fedfusion.client.app``; with ``fedfusion`` already imported, Python resolves that submodule
    through the *installed* package's ``__path__``, so the task ran the site's installed code, not the
    bundle the coordinator sent and the site approved by hash. Forgetting the installed modules right
    before the import makes ``fedfusion`` resolve from the bundle (its ``__init__`` adds the bundle's
    folders to ``__path__``). Functions already running keep their own module's globals.
    """
    names = [name for name in sys.modules if name == "fedfusion" or name.startswith("fedfusion.")]
    for name in names:
        del sys.modules[name]
    return names


def import_apps_from_their_bundle() -> None:
    """Make every ClientApp load in this task process import from the run's bundle (see
    :func:`forget_installed_fedfusion`); call in the warm executor's forked child after code approval's
    replacement of the loader and before :func:`prepare_app_while_message_arrives` (which captures it)."""
    module = run_clientapp_module()
    loader_factory = getattr(module, LOADER_FACTORY_NAME)

    def bundle_loader_factory(*args: Any, **kwargs: Any) -> Callable[[str, str, str], Any]:
        load = loader_factory(*args, **kwargs)

        def load_from_bundle(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            forget_installed_fedfusion()
            return load(fab_id, fab_version, fab_hash)

        return load_from_bundle

    setattr(module, LOADER_FACTORY_NAME, bundle_loader_factory)


def build_fab(app_dir: Path) -> bytes:
    """The FAB bytes ``flwr run APP_DIR`` would send (Flower's own deterministic build, so hashes match)."""
    from flwr.cli.build import build_fab_from_disk

    return bytes(build_fab_from_disk(Path(app_dir)))


def use_short_object_pull_backoff(initial_backoff: float, backoff_cap: float) -> None:
    """Make this process's ClientApp task retry object pulls from ``initial_backoff`` up to ``backoff_cap`` s.

    Flower's own pull function, partially applied; no try limit (Flower's 2 h ``max_time`` still applies).
    Call in the task process only: the replacement is global to Flower's ``run_clientapp`` module.
    """
    from fedfusion.common.flower_adapter import with_short_pull_backoff

    module = run_clientapp_module()
    setattr(module, OBJECT_PULL_NAME, with_short_pull_backoff(getattr(module, OBJECT_PULL_NAME), initial_backoff,
                                                               backoff_cap))


def use_short_supernode_pull_backoff(initial_backoff: float, backoff_cap: float) -> None:
    """Make this process's SuperNode loop pull a message's objects from the SuperLink with a short backoff.

    The SuperNode sees a message as soon as the ServerApp has pushed its header, often before all of its
    objects are stored; Flower's first retry then waits 1 s. Call in the SuperNode process only.
    """
    from fedfusion.common.flower_adapter import PULL_OBJECTS_NAME, with_short_pull_backoff

    module = supernode_loop_module()
    setattr(module, PULL_OBJECTS_NAME, with_short_pull_backoff(getattr(module, PULL_OBJECTS_NAME), initial_backoff,
                                                                backoff_cap))


class _TaskInputWatcher:
    """The task's Runtime API client, unchanged, except that the task input it returns is also handed to
    ``on_task_input`` (the moment the run's FAB and context are known, before the message is pulled)."""

    def __init__(self, client: Any, on_task_input: Callable[[Any], None]) -> None:
        self._client = client
        self._on_task_input = on_task_input

    def PullTaskInput(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 - Flower's method name
        response = self._client.PullTaskInput(*args, **kwargs)
        self._on_task_input(response)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def prepare_app_while_message_arrives(prepare: Callable[[Any, Any], None] | None = None) -> None:
    """Install the run's app bundle and import its ClientApp while the task's message is still arriving.

    Why: Flower's task body pulls the task input (context, run, FAB), then the message, and only then
    installs the FAB and imports the ClientApp. The message's objects usually arrive a second later (the
    SuperNode is still pulling them from the SuperLink), while install + import + the app's first data
    load cost ~1 s of CPU: measured on loopback, they ran one after the other. Here a thread starts them
    as soon as the task input is known, through whatever install and loader this process uses (the code
    approval gate's, when a site has an allow-list), then calls ``prepare(context, client_app)`` (e.g. load
    the site's data; its errors are ignored, the handler meets and reports them itself). Flower's own
    install and load calls then return that thread's results (or raise its exception, so a refused or
    broken bundle fails exactly as before). Call in the task process, after any other replacement.
    """
    import threading

    module = run_clientapp_module()
    pull_task_input = getattr(module, PULL_TASK_INPUT_NAME)
    install, loader_factory = getattr(module, INSTALL_NAME), getattr(module, LOADER_FACTORY_NAME)
    threads: list[threading.Thread] = []
    result: dict[str, Any] = {}

    def prepare_app(response: Any) -> None:
        try:
            context = module.context_from_proto(response.context)
            run, fab = module.run_from_proto(response.run), module.fab_from_proto(response.fab)
            result["installed"] = install(fab.content, skip_prompt=True)
        except BaseException as err:  # noqa: BLE001 - re-raised where Flower's own install would raise it
            result["install_error"] = err
            return
        result["key"] = (run.fab_id, run.fab_version, fab.hash_str)
        try:
            result["app"] = loader_factory(default_app_ref="", app_path=None, multi_app=True)(*result["key"])
        except BaseException as err:  # noqa: BLE001 - re-raised where Flower's own load would raise it
            result["load_error"] = err
            return
        if prepare is not None:
            try:
                prepare(context, result["app"])
            except Exception:  # noqa: BLE001, S110 - only a warm-up: the handler repeats it and reports failures
                pass

    def on_task_input(response: Any) -> None:
        if not threads:  # one task per process; a second call would be Flower's retry of the same request
            threads.append(threading.Thread(target=prepare_app, args=(response,), name="fedfusion-prepare-app",
                                            daemon=True))
            threads[0].start()

    def prepared_install(*args: Any, **kwargs: Any) -> Any:
        for thread in threads:
            thread.join()
        if "install_error" in result:
            raise result.pop("install_error")
        return result["installed"] if "installed" in result else install(*args, **kwargs)

    def prepared_loader_factory(*args: Any, **kwargs: Any) -> Callable[[str, str, str], Any]:
        def load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            for thread in threads:
                thread.join()
            if result.get("key") != (fab_id, fab_version, fab_hash):  # not what was prepared: Flower's own load
                return loader_factory(*args, **kwargs)(fab_id, fab_version, fab_hash)
            if "load_error" in result:
                raise result.pop("load_error")
            return result["app"]

        return load

    def watched_pull_task_input(client: Any) -> Any:
        return pull_task_input(_TaskInputWatcher(client, on_task_input))

    setattr(module, PULL_TASK_INPUT_NAME, watched_pull_task_input)
    setattr(module, INSTALL_NAME, prepared_install)
    setattr(module, LOADER_FACTORY_NAME, prepared_loader_factory)


def run_clientapp_task(spec: ExecutionSpec) -> None:
    """Run Flower's ClientApp task body for ``spec`` exactly as ``flwr-clientapp --token ...`` does.

    Ends through ``SystemExit`` (Flower's ``flwr_exit``), like the command.
    """
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    run_clientapp_module().run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


def run_superexec_with(executor: Any, *, runtime_api_address: str, insecure: bool,
                       root_certificates_path: str | None, parent_pid: int | None) -> None:
    """Run Flower's SuperExec task loop with ``executor`` instead of the one Flower would build by type.

    The one seam (``get_executor``) is restored afterwards; runtime dependency installation stays off.
    """
    module = importlib.import_module(RUN_SUPEREXEC_MODULE)
    original = getattr(module, EXECUTOR_FACTORY_NAME)
    setattr(module, EXECUTOR_FACTORY_NAME, lambda *args, **kwargs: executor)
    try:
        module.run_superexec(runtime_api_address=runtime_api_address, insecure=insecure,
                             root_certificates_path=root_certificates_path, parent_pid=parent_pid,
                             runtime_dependency_install=False)
    finally:
        setattr(module, EXECUTOR_FACTORY_NAME, original)


def supernode_loop_module() -> ModuleType:
    """The module holding Flower's SuperNode loop (it idles with its module-level ``time.sleep``)."""
    return importlib.import_module(SUPERNODE_LOOP_MODULE)


def replace_supernode_time(time_module: Any) -> None:
    """Make the SuperNode loop see ``time_module`` as ``time`` (nothing else in the process changes)."""
    module = supernode_loop_module()
    if not hasattr(module, "time"):
        raise RuntimeError(f"{SUPERNODE_LOOP_MODULE} no longer imports `time`: this Flower version is not supported "
                           "by fedfusion's SuperNode runner; install flwr 1.41.x")
    setattr(module, "time", time_module)  # noqa: B010 - the replacement itself, named like the canary checks


def run_flower_supernode() -> None:
    """Flower's own ``flower-supernode`` command, in this process (it reads ``sys.argv``)."""
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


def read_flower_object_tree(root: str, contents: dict[str, bytes]) -> Any:
    """A Flower object (e.g. a ``RecordDict``) from its serialized tree, as releases were stored before
    fedfusion's own format; only for reading such files once on upgrade."""
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    return inflate_object_from_contents(root, contents)
