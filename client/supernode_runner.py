"""Flower's SuperNode, unchanged except for how long it idles between polls of the SuperLink.

Flower 1.41's SuperNode (``flwr.supernode.start_client_internal``) sleeps a fixed 3 s whenever the
SuperLink has no message for it, and 0.5 s between checks for its ClientApp's reply. Sites only ever
connect outbound, so that poll is the whole latency of every message: up to 3 s before a site even
sees a train instruction. Flower offers no option for it, so this entry point runs Flower's own
``flower-supernode`` command in-process with that module's ``time.sleep`` capped at ``--poll-interval``.
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


def _capped_time_module(max_sleep_s: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` never waits longer than ``max_sleep_s``."""
    namespace = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    namespace.sleep = lambda seconds: time.sleep(min(float(seconds), max_sleep_s))
    return namespace


def install_poll_interval(poll_interval_s: float) -> None:
    """Cap the SuperNode loop's idle sleeps; only that module's view of ``time`` changes."""
    if not 0.01 <= poll_interval_s <= 60:
        raise ValueError(f"poll interval must be between 0.01 and 60 s, got {poll_interval_s}")
    from fedfusion.client.flower_runtime import replace_supernode_time

    replace_supernode_time(_capped_time_module(poll_interval_s))


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
