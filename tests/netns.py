"""A throw-away LAN of network namespaces for integration tests: one ``lan`` namespace holding a
bridge, and one namespace per host with a veth into it and an address in ``10.77.0.0/24``.

``with NetnsLan(["coordinator", "site-a"]) as lan: lan.exec_prefix("site-a")`` gives the command
prefix that runs a process on that host. On exit every process still inside a namespace of the LAN
is killed (by pid) and the namespaces are deleted, which also removes their veths; this happens
when the caller fails too, and a half-built LAN is torn down the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType

SUBNET = "10.77.0"


def netns_unavailable() -> str | None:
    """Why namespaces cannot be created here (a skip reason), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"ffprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class NetnsLan:
    """Hosts ``names`` on one bridged LAN; the first host gets ``10.77.0.1``, the next ``.2`` …"""

    def __init__(self, names: Sequence[str], tag: str | None = None) -> None:
        self.tag = tag or f"ff{os.getpid() % 100000}"
        self.lan = f"{self.tag}-lan"
        self.namespaces = {name: f"{self.tag}-h{i}" for i, name in enumerate(names)}
        self.addresses = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}
        self._created: list[str] = []

    def exec_prefix(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[name]]

    def pids(self, name: str) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.namespaces[name]], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]

    def _add(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._created.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")

    def __enter__(self) -> NetnsLan:
        try:
            self._add(self.lan)
            _ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.lan, "link", "set", "br0", "up")
            for i, (name, namespace) in enumerate(self.namespaces.items()):
                self._add(namespace)
                port = f"p{i}"
                _ip("-n", namespace, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.lan)
                _ip("-n", self.lan, "link", "set", port, "master", "br0")
                _ip("-n", self.lan, "link", "set", port, "up")
                _ip("-n", namespace, "addr", "add", f"{self.addresses[name]}/24", "dev", "eth0")
                _ip("-n", namespace, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> list[int]:
        """Kill what still runs in the LAN's namespaces, delete them; returns the pids it had to kill."""
        killed: list[int] = []
        for namespace in self._created:
            done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
            for pid in (int(p) for p in done.stdout.split()):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        if killed:
            time.sleep(0.5)
        for namespace in reversed(self._created):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self._created.clear()
        return killed

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
