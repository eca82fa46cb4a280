"""`gateway serve --workers N`: each worker listens on a socket of its own, so the kernel spreads
connections over the workers, also after a worker is replaced (read from Linux's /proc)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GatewayProcess, process_env, run_cli, wait_until
from tests.fakes.upstream import FakeUpstream

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balances on Linux only")

LISTEN, ESTABLISHED = "0A", "01"


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes  # exited (a zombie until its parent reaps it)
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_sockets(port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets on local `port` in `state`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                found.add(int(fields[9]))
    return found


def owners(pids: list[int], inodes: set[int]) -> dict[int, int]:
    """How many of `inodes` each of `pids` holds."""
    return {pid: len(socket_inodes(pid) & inodes) for pid in pids}


def listeners(gw: GatewayProcess) -> dict[int, int]:
    """Listening sockets on the gateway's port per process of its tree (the supervisor first)."""
    assert gw.proc is not None
    return owners([gw.proc.pid, *children(gw.proc.pid)], tcp_sockets(gw.port, LISTEN))


@pytest.fixture
def workers(tmp_path: Path, upstream: FakeUpstream) -> Iterator[GatewayProcess]:
    env = process_env(
        tmp_path / "gateway.db",
        upstream,
        GATEWAY_JOURNAL_DIR=str(tmp_path / "journal"),
        GATEWAY_WATCHDOG_SECONDS="2",  # (the default is 30)
    )
    gw = GatewayProcess(env, args=("--workers", "3")).start()
    try:
        wait_until(lambda: len(worker_pids(gw)) == 3, timeout=30)  # every worker listening
        yield gw
    finally:
        gw.stop()


def worker_pids(gw: GatewayProcess) -> list[int]:
    """The supervisor's children that listen (multiprocessing may start a helper that does not)."""
    assert gw.proc is not None
    return sorted(pid for pid, n in listeners(gw).items() if n and pid != gw.proc.pid)


def test_each_worker_listens_on_its_own_socket(workers: GatewayProcess) -> None:
    assert workers.proc is not None
    held = listeners(workers)
    assert held[workers.proc.pid] == 0  # the supervisor holds the port but never accepts
    assert sorted(held[p] for p in worker_pids(workers)) == [1, 1, 1]
    assert len(tcp_sockets(workers.port, LISTEN)) == 3


def test_connections_spread_over_the_workers(workers: GatewayProcess) -> None:
    """30 keep-alive connections opened at once: on one shared socket, the worker that wakes first
    may accept them all; with a socket each, every worker gets some (all on one: p < 1e-4)."""
    conns = [socket.create_connection(("127.0.0.1", workers.port)) for _ in range(30)]
    try:
        for c in conns:
            c.sendall(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
        for c in conns:
            assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
        held = owners(worker_pids(workers), tcp_sockets(workers.port, ESTABLISHED))
        assert sum(held.values()) == 30, held
        assert all(n > 0 for n in held.values()), held
    finally:
        for c in conns:
            c.close()


def test_a_replaced_worker_listens_on_a_new_socket_of_its_own(workers: GatewayProcess) -> None:
    assert workers.proc is not None
    before = worker_pids(workers)
    supervisor_sockets = len(socket_inodes(workers.proc.pid))
    os.kill(before[0], signal.SIGKILL)

    def replaced() -> list[int] | None:
        pids = worker_pids(workers)  # one reading: the killed worker may still listen a moment
        return pids if len(pids) == 3 and before[0] not in pids else None

    after = wait_until(replaced, timeout=60)
    assert len(set(after) - set(before)) == 1
    assert sorted(listeners(workers)[p] for p in after) == [1, 1, 1]
    assert len(tcp_sockets(workers.port, LISTEN)) == 3  # the dead worker's socket is gone with it
    assert len(socket_inodes(workers.proc.pid)) == supervisor_sockets  # the parent kept no copy
    workers.wait_healthy()


def test_a_worker_stopped_and_resumed_is_not_taken_for_stuck(workers: GatewayProcess) -> None:
    """SIGSTOP for longer than the watchdog's 2 s (as a paused container), then SIGCONT: the loop
    turns again at once, so the worker keeps running (a stuck loop would end it)."""
    paused = worker_pids(workers)[0]
    os.kill(paused, signal.SIGSTOP)
    try:
        time.sleep(3)  # the scenario: a process that does not run for 3 s
    finally:
        os.kill(paused, signal.SIGCONT)
    time.sleep(2)  # longer than the watchdog's look and its moment of grace
    assert paused in worker_pids(workers)
    workers.wait_healthy()


def test_a_port_in_use_is_a_clear_error(tmp_path: Path, upstream: FakeUpstream) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = process_env(tmp_path / "gateway.db", upstream, GATEWAY_HOST="127.0.0.1")
        done = run_cli(env, "serve", "--workers", "2", "--port", str(port))
    assert done.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use" in done.stderr


def test_sighup_replaces_every_worker_each_on_a_new_socket(workers: GatewayProcess) -> None:
    """uvicorn's rolling restart: each new worker is ready before the old one stops."""
    assert workers.proc is not None
    before = set(worker_pids(workers))
    supervisor = workers.proc.pid
    supervisor_sockets = len(socket_inodes(supervisor))
    workers.proc.send_signal(signal.SIGHUP)

    def replaced() -> list[int] | None:
        pids = worker_pids(workers)
        return pids if len(pids) == 3 and not before & set(pids) else None

    after = wait_until(replaced, timeout=60)
    assert sorted(listeners(workers)[p] for p in after) == [1, 1, 1]
    assert len(tcp_sockets(workers.port, LISTEN)) == 3
    # the supervisor keeps no copy once the restart is done (the last old worker may still be stopping)
    wait_until(lambda: len(socket_inodes(supervisor)) == supervisor_sockets, timeout=30)
    workers.wait_healthy()


def test_sigttin_adds_a_worker_on_a_socket_of_its_own(workers: GatewayProcess) -> None:
    assert workers.proc is not None
    supervisor = workers.proc.pid
    supervisor_sockets = len(socket_inodes(supervisor))
    workers.proc.send_signal(signal.SIGTTIN)

    def four() -> list[int] | None:
        pids = worker_pids(workers)
        return pids if len(pids) == 4 else None

    added = wait_until(four, timeout=60)
    assert sorted(listeners(workers)[p] for p in added) == [1, 1, 1, 1]
    assert len(tcp_sockets(workers.port, LISTEN)) == 4
    # the new worker's health-check pipe (two ends) and no copy of its listening socket
    wait_until(lambda: len(socket_inodes(supervisor)) == supervisor_sockets + 2, timeout=30)


def test_a_second_gateway_on_the_same_port_is_refused(workers: GatewayProcess, tmp_path: Path) -> None:
    """SO_REUSEPORT would let a second `serve --workers` join the port and take half its connections."""
    env = {k: v for k, v in workers.env.items() if k.startswith(("GATEWAY_", "ANTHROPIC_", "GEMINI_"))}
    env["GATEWAY_DATABASE_URL"] = f"sqlite:///{tmp_path / 'other.db'}"
    done = run_cli(env, "serve", "--workers", "2", timeout=30)  # (serving would not end)
    assert done.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{workers.port}: [Errno 98] Address already in use" in done.stderr
    assert len(tcp_sockets(workers.port, LISTEN)) == 3
