"""Process helpers: spawning pinned processes, ports, peak RSS, CPU accounting, tools, the work dir."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .settings import APT_PACKAGES, CONTENDER_CPU, ECHO_MODULE, LOAD_CPU, LUA_MODULE, NDK_MODULE, ROOT

# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def spawn(name: str, argv: Sequence[str], logdir: Path, cpu: str | None, env: dict[str, str] | None = None) -> Proc:
    log = logdir / f"{name}.log"
    cmd = (["taskset", "-c", cpu] if cpu is not None else []) + list(argv)
    with log.open("ab") as fh:
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    return Proc(name, popen, log)


def wait_port(proc: Proc, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout:.0f}s:\n{proc.tail()}")


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
    return pids


def peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (peak resident set) over the process and its children, in MB."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_times() -> dict[str, tuple[float, float]]:
    """CPU number -> (user+nice+system seconds, steal seconds) from /proc/stat."""
    out: dict[str, tuple[float, float]] = {}
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3].isdigit():
                f = line.split()
                user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in f[1:9])
                out[f[0][3:]] = ((user + nice + system) / CLK_TCK, steal / CLK_TCK)
    return out


def tree_user_system_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process and its live children."""
    user = system = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live children."""
    return sum(tree_user_system_seconds(pid))


@dataclass
class CpuWindow:
    """CPU used during a cell by processes that are not ours (other work on the machine) and steal.

    A contender pinned to CONTENDER_CPU is accounted per CPU; one spread over both CPUs (several
    workers) shares LOAD_CPU with the load, so its foreign share is taken over the two CPUs together
    (key "0+1"). `service_pids` (PostgreSQL backends, pinned to LOAD_CPU) count as ours, and their CPU
    is reported apart (`service_seconds`).
    """

    contender_pid: int
    load_pids: list[int]
    contender_cpus: str = CONTENDER_CPU
    service_pids: list[int] = field(default_factory=list)
    start: dict[str, tuple[float, float]] = field(default_factory=dict)
    ours: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    contender_seconds: float = 0.0  # CPU the contender's processes used in the window
    service_seconds: float = 0.0  # CPU the service processes used in the window
    load_seconds: float = 0.0  # CPU wrk and the upstream used in the window
    service_start: dict[int, float] = field(default_factory=dict)

    def _used(self) -> dict[str, float]:
        # Per pid against its own start: a backend that exits in the window must not count negative.
        now = {p: tree_cpu_seconds(p) for p in self.service_pids}
        if not self.ours:
            self.service_start = now
        services = sum(max(0.0, v - self.service_start.get(p, v)) for p, v in now.items() if v)
        return {
            "contender": tree_cpu_seconds(self.contender_pid),
            "load": sum(tree_cpu_seconds(p) for p in self.load_pids) + children_cpu_seconds() + services,
            "services": services,
        }

    def __enter__(self) -> CpuWindow:
        self.start = cpu_times()
        self.ours = self._used()
        self.wall = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        end = cpu_times()
        self.wall = time.monotonic() - self.wall
        after = self._used()
        used = {k: v - self.ours[k] for k, v in after.items() if k != "services"}
        used["services"] = after["services"]
        cpus = (CONTENDER_CPU, LOAD_CPU)
        busy = {cpu: end[cpu][0] - self.start[cpu][0] for cpu in cpus}
        if LOAD_CPU in self.contender_cpus.split(","):
            self.foreign = {"0+1": max(0.0, sum(busy.values()) - used["contender"] - used["load"]) / self.wall}
        else:
            self.foreign = {
                CONTENDER_CPU: max(0.0, busy[CONTENDER_CPU] - used["contender"]) / self.wall,
                LOAD_CPU: max(0.0, busy[LOAD_CPU] - used["load"]) / self.wall,
            }
        self.steal = {cpu: (end[cpu][1] - self.start[cpu][1]) / self.wall for cpu in cpus}
        self.busy = {cpu: busy[cpu] / self.wall for cpu in cpus}
        self.contender_seconds = used["contender"]
        self.service_seconds = used["services"]
        self.load_seconds = used["load"] - used["services"]


def wait_quiet(timeout: float) -> None:
    """Wait (at most `timeout` s) until other processes use less than 10% of a CPU in total."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        before = cpu_times()
        time.sleep(0.5)
        after = cpu_times()
        busy = sum(after[c][0] - before[c][0] + after[c][1] - before[c][1] for c in after) / 0.5
        if busy < 0.1 or time.monotonic() > deadline:
            return
        if not said:
            print(f"  (waiting up to {timeout:.0f} s: other processes use {busy:.0%} of a CPU)", flush=True)
            said = True


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def ensure_tools() -> None:
    missing = [p for p, ok in (("nginx", shutil.which("nginx")), ("wrk", shutil.which("wrk"))) if not ok]
    if missing or not all(m.exists() for m in (ECHO_MODULE, NDK_MODULE, LUA_MODULE)):
        print(f"installing {' '.join(APT_PACKAGES)} with apt-get ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", *APT_PACKAGES], check=True, env=env)
    if not shutil.which("taskset"):
        raise SystemExit("taskset (util-linux) is required")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs: contender on CPU 0, load on CPU 1")


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="polar-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
