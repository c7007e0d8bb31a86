"""The one place fedfusion touches Flower internals shared by the site and the coordinator.

Why: Flower's public API (``flwr.app``, ``flwr.clientapp``, ``flwr.clientapp.mod``, ``flwr.serverapp``,
``flwr.serverapp.strategy``, ``flwr.simulation`` and the legacy top-level ``flwr.client``/``flwr.server``/
``flwr.common`` names) is stable across releases; its internals (``flwr.supercore``, ``flwr.supernode``,
``flwr.cli``, ``flwr.common.<submodule>``, private methods) move between minor releases without notice.
Every internal name we use is imported here (or, for the site's ClientApp task runtime, in
:mod:`fedfusion.client.flower_runtime`), each with a canary in ``tests/unit/test_flower_canaries.py``,
and ``tests/unit/test_flower_canaries.py::test_no_module_outside_the_adapters_uses_flower_internals``
keeps it that way. An upgrade then means: bump :data:`VERIFIED_FLOWER`, run the canaries, fix only
these two modules.

:func:`check_flower_version` runs when the ClientApp, the ServerApp, the site daemon and the coordinator
start: an unverified Flower is refused with one clear line instead of failing later inside a round.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from importlib import metadata
from types import TracebackType

from flwr.app import Context, Message, RecordDict
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

#: The Flower releases whose internals the adapters and their canaries were checked against.
VERIFIED_FLOWER = ">=1.41,<1.42"
#: Set to ``1`` to run on an unverified Flower anyway (a warning is logged); for trying an upgrade.
ALLOW_UNVERIFIED_ENV = "FEDFUSION_ALLOW_UNVERIFIED_FLOWER"

_log = logging.getLogger("fedfusion.flower")


class UnverifiedFlowerError(RuntimeError):
    """The installed Flower is outside :data:`VERIFIED_FLOWER` and no override was given."""


def installed_flower_version() -> str:
    """The installed ``flwr`` distribution's version (from its metadata: importing Flower is not needed)."""
    return metadata.version("flwr")


def unverified_message(component: str, installed: str) -> str:
    """One line naming what runs, the installed and the verified Flower versions, and the two ways out."""
    return (f"{component}: Flower {installed} is installed but fedfusion is verified only with "
            f"flwr{VERIFIED_FLOWER} (it relies on Flower internals, see fedfusion/common/flower_adapter.py); "
            f"install 'flwr==1.41.*', or set {ALLOW_UNVERIFIED_ENV}=1 to run anyway at your own risk")


def is_verified(version: str) -> bool:
    """Whether ``version`` lies in :data:`VERIFIED_FLOWER` (a 1.41.x pre-release counts; 1.42.0rc1 does not)."""
    try:
        return SpecifierSet(VERIFIED_FLOWER, prereleases=True).contains(Version(version))
    except InvalidVersion:
        return False


def check_flower_version(component: str = "fedfusion", *, installed: str | None = None,
                         environ: Mapping[str, str] | None = None) -> str:
    """Refuse to start ``component`` on an unverified Flower; return the installed version.

    With ``FEDFUSION_ALLOW_UNVERIFIED_FLOWER=1`` it warns (``RuntimeWarning`` and the log) and goes on.
    """
    version = installed if installed is not None else installed_flower_version()
    if is_verified(version):
        return version
    message = unverified_message(component, version)
    if (environ if environ is not None else os.environ).get(ALLOW_UNVERIFIED_ENV, "").strip() == "1":
        _log.warning("%s (allowed by %s=1)", message, ALLOW_UNVERIFIED_ENV)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return version
    raise UnverifiedFlowerError(message)


try:  # Internal names: a Flower that moved one fails here with the version line, not a bare ImportError.
    from flwr.common.constant import ErrorCode
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.serverapp.exception import InconsistentMessageReplies
    from flwr.supercore import log as flower_log
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
    from flwr.supercore.task_identity import TaskIdentity
except ImportError as _missing:  # pragma: no cover - only on an unverified Flower
    raise ImportError(f"{unverified_message('fedfusion', installed_flower_version())} ({_missing})") from _missing

# Our own aliases: Flower's (``flwr.clientapp.typing``) are not part of its documented API. A canary checks
# they still equal Flower's, so a mod written against them still fits ``ClientApp(mods=[...])``.
ClientAppCallable = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, ClientAppCallable], Message]

#: The three ids Flower's runtime gives the task process (``flwr.supercore.task_identity.TaskIdentity``).
_IDENTITY_ATTRS = ("_task_id", "_run_id", "_node_id")


class MessageIdentity(AbstractContextManager["MessageIdentity"]):
    """The task identity :func:`message_identity` set, and the one it replaced (put back on exit)."""

    def __init__(self, task_id: int, run_id: int, node_id: int) -> None:
        self.previous: tuple[int | None, ...] = tuple(getattr(TaskIdentity, a) for a in _IDENTITY_ATTRS)
        for attr, value in zip(_IDENTITY_ATTRS, (task_id, run_id, node_id), strict=True):
            setattr(TaskIdentity, attr, value)

    def restore(self) -> None:
        """Put back the identity that was there before (``None``s outside a Flower process)."""
        for attr, value in zip(_IDENTITY_ATTRS, self.previous, strict=True):
            setattr(TaskIdentity, attr, value)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.restore()


def message_identity(task_id: int = 1, run_id: int = 1, node_id: int = 0) -> MessageIdentity:
    """Let ``Message(...)`` be built outside Flower's runtime: set the process's task identity now.

    Why: since Flower 1.41 a new Message reads its run id, source node and task id from the class-level
    ``TaskIdentity``, which only Flower's ServerApp/ClientApp process set-up fills in; anywhere else
    (tests, benchmarks, in-process runs) ``Message(content, dst_node_id=..., message_type=...)`` raises
    ``RuntimeError: TaskIdentity.run_id is not set``. The ids are process-global: a script may call this
    once and keep it; ``with message_identity(): ...`` puts the previous ids back on exit. Not thread-safe
    (nor is Flower's own set-up): set it before starting threads that build Messages.
    """
    return MessageIdentity(task_id, run_id, node_id)


def serialized_size(content: RecordDict) -> int:
    """Bytes ``content`` takes in Flower's wire format (the protobuf its gRPC messages carry).

    Why: communication cost is measured as Flower sends it, not as our in-memory arrays; the wire format
    adds per-record and per-array framing (keys, dtype, shape), which a ``nbytes`` sum misses.
    """
    return len(recorddict_to_proto(content).SerializeToString())


def roundtrip(content: RecordDict) -> RecordDict:
    """``content`` as the receiver gets it after Flower serialises and parses it (to proto and back).

    Why: in-process test beds hand Python objects across; this exposes what does not survive the wire
    (types Flower converts, shared references, object ids) without a SuperLink.
    """
    return recorddict_from_proto(recorddict_to_proto(content))

#: Flower's deployment Grid module; the ServerApp's replies are pulled through its ``pull_objects``.
GRID_MODULE = "flwr.superlink.grid.http_grid"
#: Flower's object-pull function (``flwr.supercore.inflatable.inflatable_utils``), as the Grid and the
#: SuperNode loop each import it by name.
PULL_OBJECTS_NAME = "pull_objects"


def with_short_pull_backoff(pull: Callable[..., object], initial_backoff: float,
                            backoff_cap: float) -> Callable[..., object]:
    """Flower's object-pull function ``pull`` retrying an unavailable object after ``initial_backoff`` s,
    doubling up to ``backoff_cap`` s, with no try limit (Flower's own 2 h ``max_time`` still bounds it).

    Why: a receiver learns of a message before its sender has stored all of its objects (one per array
    and record), and Flower then waits 1 s, 2 s, ... (cap 10 s): measured on loopback, ~1 s of every
    hop. Applied to an already-shortened function it replaces the earlier setting (never nests).
    """
    import functools

    original = getattr(pull, "_fedfusion_original", pull)
    shortened = functools.partial(original, initial_backoff=initial_backoff, backoff_cap=backoff_cap,
                                  max_tries_per_object=None)
    shortened._fedfusion_original = original  # type: ignore[attr-defined]
    return shortened


def use_short_grid_pull_backoff(initial_backoff: float, backoff_cap: float) -> None:
    """Make this process's deployment Grid pull reply objects with :func:`with_short_pull_backoff`.

    Call in the ServerApp process (idempotent; the simulation's in-memory Grid pulls nothing).
    """
    import importlib

    module = importlib.import_module(GRID_MODULE)
    setattr(module, PULL_OBJECTS_NAME, with_short_pull_backoff(getattr(module, PULL_OBJECTS_NAME),
                                                                initial_backoff, backoff_cap))


__all__ = [
    "ALLOW_UNVERIFIED_ENV", "ClientAppCallable", "ErrorCode", "InconsistentMessageReplies", "KEY_CLIPPING_NORM",
    "MessageIdentity", "Mod", "UnverifiedFlowerError", "VERIFIED_FLOWER", "check_flower_version", "flower_log",
    "installed_flower_version", "is_verified", "message_identity", "roundtrip", "serialized_size",
    "unverified_message",
]
