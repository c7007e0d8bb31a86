"""A warm SuperExec for a site: Flower's own task loop, with ClientApp processes forked from a preloaded parent.

Why this exists: Flower's default SuperExec starts a fresh ``flwr-clientapp`` process for every train
and evaluate message, and each one spends seconds importing torch, timm, opacus and pandas before it
trains for one second (shared/FLOWER-1.41.md measured >99 % of a loopback round as overhead). Flower's
``Executor`` interface (``flwr.supercore.superexec.executor``) is where it decides *how* a task process
starts, so we plug in here rather than write any networking of our own:

- the task loop, the Runtime API client, authentication and task tokens stay Flower's
  (``run_superexec``); only process creation changes;
- the parent imports the heavy third-party libraries once; each task then runs Flower's own
  ``run_clientapp`` in a child made by ``fork()``, so a task still gets a fresh process (isolation and
  clean-up as in Flower's default) but starts in milliseconds;
- in the child, the app bundle is installed and imported, and the site's data loaded, while the
  message's objects are still arriving (:func:`fedfusion.client.flower_runtime.prepare_app_while_message_arrives`),
  not after them;
- fedfusion's own modules are *not* preloaded: the child imports them from the run's FAB, so the code
  that trains is exactly the bundle the coordinator sent (and the site may approve by hash).

The parent never runs torch operations, so no OpenMP/CUDA state exists before ``fork()``; CUDA is first
touched in the child. POSIX only (hospital Linux hosts); elsewhere use Flower's default SuperExec.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from logging import INFO, WARNING
from typing import Any

from fedfusion.client import flower_runtime
from fedfusion.client.flower_runtime import ExecutionSpec, LaunchResult, TaskType
from fedfusion.common.flower_adapter import flower_log as log

# Third-party modules every fedfusion ClientApp imports; importing them once is the whole saving.
PRELOADED_MODULES: tuple[str, ...] = (
    "numpy", "pandas", "torch", "torch.nn", "torch.utils.data", "torchvision", "timm", "opacus",
    "sklearn.metrics", "PIL.Image", "pydicom", "nibabel",
    "flwr.app", "flwr.clientapp", flower_runtime.RUN_CLIENTAPP_MODULE,
)
# How often the loop asks the SuperNode for a task; Flower's default is 1 s, which alone would
# add up to a second per message to every round.
DEFAULT_POLL_INTERVAL_S = 0.05
# The SuperNode hands a task out while it is still storing the message's objects (one per tensor), so
# the task's first pulls often find them unavailable; Flower then backs off 1 s, 2 s, … (measured:
# ~3 s of a 3.5 s task). Retrying after 20 ms doubling to 0.1 s gets them as soon as they are stored (these
# are requests to the site's own SuperNode on the same host; a 0.5 s cap still left ~0.3 s per task).
OBJECT_PULL_INITIAL_BACKOFF_S = 0.02
OBJECT_PULL_BACKOFF_CAP_S = 0.1
_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
#: The app module whose site loader :func:`load_site_data` calls (the one the run's app imported).
SITE_RUNTIME_MODULE = "fedfusion.client.runtime"


def preload(modules: Sequence[str] = PRELOADED_MODULES) -> list[str]:
    """Import ``modules`` in this (parent) process; return the ones that are not installed."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class ForkingExecutor:
    """Flower ``Executor`` whose task processes are ``fork()`` children of a warm parent.

    Only ClientApp tasks are accepted: this executor serves one SuperNode, and a SuperNode only runs
    ClientApps. The Runtime API still owns task status, exactly as with Flower's subprocess executor.
    """

    def __init__(self, approved_apps: frozenset[str] | None = None) -> None:
        self._children: set[int] = set()
        # None: no approval policy (Flower's behaviour); otherwise only these FAB hashes may load.
        self.approved_apps = approved_apps

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[TaskType], set[str]]:
        """Accept ClientApp tasks only; there is no capacity limit beyond the SuperNode's own."""
        del insecure, root_certificates_path
        return supported_task_types & {TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        """Return at once: forking has no capacity gate."""
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a child that runs Flower's ``run_clientapp`` with the task's token."""
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"the warm site executor runs ClientApps only, not {spec.task_type}")
        try:
            pid = os.fork()
        except OSError as err:
            return LaunchResult.failed(f"fork() failed: {err}")
        if pid == 0:  # child: never returns
            _run_task_in_child(spec, self.approved_apps)
        self._children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children so none linger as zombies between polls."""
        for pid in list(self._children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self._children.discard(pid)
                continue
            if done:
                self._children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    log(WARNING, "ClientApp process %d exited with code %d", pid, code)

    def close(self) -> None:
        """Stop running children on shutdown; Flower's task expiry reports them to the server."""
        for pid in list(self._children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self._children and time.monotonic() < deadline:
            self.reconcile()
            time.sleep(0.05)


def _run_task_in_child(spec: ExecutionSpec, approved_apps: frozenset[str] | None = None) -> None:
    """Body of a forked task process: behave exactly like ``flwr-clientapp --token ...``."""
    code = 1
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        if approved_apps is not None:
            from fedfusion.client.approval import install_approval_check

            install_approval_check(approved_apps, on_refusal=_log_refusal)
        # Flower's own pull, with a short backoff; no try limit (Flower's max_time of 2 h still applies)
        # so a large model arriving over a slow hospital uplink is waited for, not abandoned.
        flower_runtime.use_short_object_pull_backoff(OBJECT_PULL_INITIAL_BACKOFF_S, OBJECT_PULL_BACKOFF_CAP_S)
        # The app's fedfusion modules come from the run's bundle, not from this site's installed copy that the
        # parent imported (the code the site approved by hash is the code that runs).
        flower_runtime.import_apps_from_their_bundle()
        # Install, import and load the site's data while the message's objects are still arriving (after the
        # approval check is in place: the preparation goes through it).
        flower_runtime.prepare_app_while_message_arrives(load_site_data)
        flower_runtime.run_clientapp_task(spec)
        code = 0
    except SystemExit as done:  # run_clientapp always ends through flwr_exit
        code = done.code if isinstance(done.code, int) else 1
    except BaseException as err:  # noqa: BLE001 - a child must never fall back into the parent's loop
        print(f"fedfusion warm executor: task {spec.task_id} failed: {err!r}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def load_site_data(context: Any, client_app: Any) -> None:
    """Warm-up of a task process: load the site's manifest and datasets as the app's handlers will.

    Uses the site runtime the loaded app itself imported (its ``site_from_context`` caches per process),
    so the handler finds the data ready; ~0.5 s of manifest validation per task moves off the round's path.
    Only for a bundle's real ClientApp: when code approval refused the bundle, the loader returns a refusing
    stand-in (a plain function) and no data may be read.
    """
    from flwr.clientapp import ClientApp

    if not isinstance(client_app, ClientApp):
        return
    runtime = sys.modules.get(SITE_RUNTIME_MODULE)
    site_from_context = getattr(runtime, "site_from_context", None)
    if site_from_context is not None:
        site_from_context(dict(context.node_config), dict(context.run_config))


def _log_refusal(digest: str, reason: str) -> None:
    log(WARNING, "REFUSED run: app bundle sha256=%s: %s", digest, reason)


def run_warm_superexec(runtime_api_address: str, *, insecure: bool, root_certificates_path: str | None = None,
                       parent_pid: int | None = None, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
                       approved_apps: frozenset[str] | None = None) -> None:
    """Run Flower's SuperExec loop against a SuperNode's Runtime API with the forking executor.

    The SuperNode must run with ``--isolation process`` (so that it does not start its own SuperExec).
    ``parent_pid`` makes this process exit when the SuperNode does, as Flower's own SuperExec does.
    """
    if not hasattr(os, "fork"):
        raise RuntimeError("the warm site executor needs fork() (Linux/macOS); use Flower's default isolation")
    from fedfusion.common.flower_adapter import check_flower_version

    check_flower_version("fedfusion warm SuperExec")
    missing = preload()
    log(INFO, "fedfusion warm SuperExec: preloaded %d modules%s", len(PRELOADED_MODULES) - len(missing),
        f" (not installed: {', '.join(missing)})" if missing else "")
    os.environ.setdefault(_POLL_ENV, str(poll_interval_s))
    executor = ForkingExecutor(approved_apps)
    if approved_apps is not None:
        log(INFO, "fedfusion warm SuperExec: only %d approved app bundle(s) may run", len(approved_apps))
    # The one seam: Flower builds its executor by type; ours is handed in instead.
    flower_runtime.run_superexec_with(executor, runtime_api_address=runtime_api_address, insecure=insecure,
                                      root_certificates_path=root_certificates_path, parent_pid=parent_pid)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedfusion.client.warm_executor``: started by ``fedfusion site start`` beside the SuperNode."""
    import argparse

    parser = argparse.ArgumentParser(description="fedfusion warm SuperExec for one SuperNode")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    parser.add_argument("--root-certificates", default=None,
                        help="CA for a TLS Runtime API; without it the loopback Runtime API is used unencrypted, "
                             "as Flower's own SuperNode does with its SuperExec")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL_S)
    parser.add_argument("--approved-apps", default=None, metavar="SHA256[,SHA256...]",
                        help="run only app bundles with these hashes (an empty value approves none); "
                             "without the option every bundle runs, as with Flower's own SuperExec")
    args = parser.parse_args(argv)
    approved = None
    if args.approved_apps is not None:
        from fedfusion.client.approval import normalise_hashes

        approved = normalise_hashes([h for h in args.approved_apps.split(",") if h], "--approved-apps")
    run_warm_superexec(args.runtime_api_address, insecure=args.root_certificates is None,
                       root_certificates_path=args.root_certificates, parent_pid=args.parent_pid,
                       poll_interval_s=args.poll_interval, approved_apps=approved)


if __name__ == "__main__":
    main()
