"""`gateway serve --workers N`: uvicorn's supervisor, with a listening socket of its own per worker.

On one shared listening socket, the worker whose loop wakes first accepts every connection that
is pending (libuv accepts until the queue is empty), so a client that opens its keep-alive pool at
once can land whole on one worker while the others idle (seen: 16 of 16 connections on one of two
workers in one run of six). With a socket per worker bound with `SO_REUSEPORT`, Linux hashes each
new connection to one of the listening sockets, so connections spread over the workers whatever
their timing. The parent keeps a socket bound to the address but never listening: it holds the
port (and resolves port 0) and receives no connections. Elsewhere than Linux `SO_REUSEPORT` does
not balance, and the workers share one socket as in uvicorn.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

BALANCED = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def reserve(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` and never listening (with `BALANCED`, others can join its port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if BALANCED and port:
        # With SO_REUSEPORT the bind would also succeed beside another gateway of this user that
        # already serves the port, and the two would share its connections: bind once without it.
        with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if BALANCED:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def listener_for(reserved: socket.socket) -> socket.socket:
    """A worker's own socket on the reserved address (the worker listens on it)."""
    sock = socket.socket(reserved.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(reserved.getsockname()[:2])
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Supervisor(Multiprocess):
    """Starts N workers and restarts one that dies (uvicorn's), each worker on a socket of its own.

    uvicorn reads `sockets` once for each worker it starts, and starts it at once; here that read
    makes the worker's socket. The parent closes its copy once the worker has started: at the next
    read, or at the supervisor's next round (every 0.5 s, after the signals it handles: SIGHUP
    restarts every worker, SIGTTIN adds one). `on_exit(pid)` is told which worker died.
    """

    def __init__(self, config: uvicorn.Config, reserved: socket.socket, on_exit: Callable[[int], None]) -> None:
        self._reserved = reserved
        self._handed: list[socket.socket] = []
        self._on_exit = on_exit
        super().__init__(config, sockets=[reserved])

    @property
    def sockets(self) -> list[socket.socket]:
        if not BALANCED:
            return [self._reserved]
        self._close_handed()  # the worker the last one was made for has started: uvicorn starts each at once
        sock = listener_for(self._reserved)
        self._handed.append(sock)
        return [sock]

    @sockets.setter
    def sockets(self, value: list[socket.socket]) -> None:
        pass  # (uvicorn's __init__ assigns the list it was given; `sockets` is made per worker)

    def _close_handed(self) -> None:
        # A started worker holds its own descriptor of the socket (inherited when it was spawned).
        for sock in self._handed:
            sock.close()
        self._handed.clear()

    @property
    def failed_to_start(self) -> bool:
        """uvicorn stopped every worker because one failed its startup (and would on every restart)."""
        return any(p.exitcode == STARTUP_FAILURE for p in self.processes)

    def keep_subprocess_alive(self) -> None:
        before = [p.pid for p in self.processes]
        super().keep_subprocess_alive()
        self._close_handed()
        for old, new in zip(before, [p.pid for p in self.processes], strict=True):
            if old is not None and old != new:
                self._on_exit(old)
