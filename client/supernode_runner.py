"""Flower's SuperNode, unchanged except for how long it idles between polls of the SuperLink.

Flower 1.41's SuperNode (``flwr.supernode.start_client_internal``) sleeps a fixed 3 s whenever the
SuperLink has no message for it, and 0.5 s between checks for its ClientApp's reply. Sites only ever
connect outbound, so that poll is the whole latency of every message: up to 3 s before a site even
sees a train instruction. Flower offers no option for it, so this entry point runs Flower's own
``flower-supernode`` command in-process with that module's ``time.sleep`` capped: the idle poll of the
SuperLink (Flower's sleeps of 1 s and more) at ``--poll-interval``, the waits for the local ClientApp's
reply (its sub-second sleeps; an in-process state lookup, no network) at :data:`LOCAL_WAIT_S`. When a
message arrives before the coordinator has stored all of its objects, Flower's pull retries after 1 s,
then 2 s, ...; here after 20 ms doubling to 0.25 s (measured: ~1 s of every round on loopback).
Every other behaviour (TLS, authentication, reconnect, Runtime API, node config) is Flower's.

The price is polling traffic: each site asks the SuperLink ``1 / poll_interval`` times a second while
idle. The default (0.25 s) is negligible for tens of sites; raise it (``[supernode] poll-interval`` in
``site.toml``) for federations of hundreds, or set it to 3 to get Flower's default back.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Sequence

DEFAULT_POLL_INTERVAL_S = 0.25
#: Cap of the SuperNode's waits for its own ClientApp's reply (local state lookups; Flower waits 0.5 s).
LOCAL_WAIT_S = 0.02
#: Flower's sleeps shorter than this are local waits, the longer ones (3 s) idle polls of the SuperLink.
_IDLE_SLEEP_S = 1.0
#: Retry of a message object the SuperLink does not hold yet: first after 20 ms, doubling up to 0.25 s
#: (at most ~8 requests a second per waiting site; a 0.5 s cap still cost ~0.4 s per message on loopback).
OBJECT_PULL_INITIAL_BACKOFF_S = 0.02
OBJECT_PULL_BACKOFF_CAP_S = 0.25


def _capped_time_module(max_sleep_s: float, local_wait_s: float = LOCAL_WAIT_S) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` waits at most ``max_sleep_s`` for an idle poll
    (Flower's sleeps of 1 s or more) and at most ``local_wait_s`` for anything shorter."""
    namespace = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})

    def sleep(seconds: float) -> None:
        seconds = float(seconds)
        time.sleep(min(seconds, max_sleep_s if seconds >= _IDLE_SLEEP_S else local_wait_s))

    namespace.sleep = sleep
    return namespace


def install_poll_interval(poll_interval_s: float) -> None:
    """Cap the SuperNode loop's sleeps and shorten its object-pull backoff; nothing else in the process changes."""
    if not 0.01 <= poll_interval_s <= 60:
        raise ValueError(f"poll interval must be between 0.01 and 60 s, got {poll_interval_s}")
    from fedfusion.client.flower_runtime import replace_supernode_time, use_short_supernode_pull_backoff

    replace_supernode_time(_capped_time_module(poll_interval_s))
    use_short_supernode_pull_backoff(OBJECT_PULL_INITIAL_BACKOFF_S, OBJECT_PULL_BACKOFF_CAP_S)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedfusion.client.supernode_runner [--poll-interval S] <flower-supernode arguments>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    poll = DEFAULT_POLL_INTERVAL_S
    if args[:1] == ["--poll-interval"]:
        poll = float(args[1])
        args = args[2:]
    from fedfusion.client.flower_runtime import run_flower_supernode
    from fedfusion.common.flower_adapter import check_flower_version

    check_flower_version("fedfusion site SuperNode")
    install_poll_interval(poll)
    sys.argv = ["flower-supernode", *args]
    run_flower_supernode()


if __name__ == "__main__":
    main()
