"""Time to first byte of a stream at 1 connection: how much the relay adds before the first event.

A raw-socket client in the harness process, pinned to the load CPU, sends sequential streaming
requests on one keep-alive connection and times each from the request sent to the first byte of
the response body; every body is read to its end and checked byte-identical to the fixture.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .contenders import Contender
from .fixtures import Cell
from .load import raw_request
from .processes import wait_quiet
from .settings import LOAD_CPU, TARGET_TTFB_MS, TTFB_CONTENDERS

# --- time to first byte --------------------------------------------------------------------


@dataclass
class TtfbResult:
    contender: str
    samples_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else 0.0

    @property
    def p99_ms(self) -> float:
        if not self.samples_ms:
            return 0.0
        ordered = sorted(self.samples_ms)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@contextlib.contextmanager
def pinned(cpu: str) -> Iterator[None]:
    """Run the calling thread on `cpu` (the load CPU), GC off; restore both afterwards."""
    before = os.sched_getaffinity(0)
    was_enabled = gc.isenabled()
    os.sched_setaffinity(0, {int(cpu)})
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        os.sched_setaffinity(0, before)


class Reader:
    """Buffered reads from a blocking socket: just enough HTTP/1.1 for the fixture responses."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the contender")
        self.buf += data

    def until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            self.fill()
        out = bytes(self.buf[: i + len(sep)])
        del self.buf[: i + len(sep)]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def body(self, head: bytes) -> bytes:
        """The body after `head` (the status line and headers), de-chunked."""
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if "chunked" in headers.get("transfer-encoding", ""):
            out = bytearray()
            while size := int(self.until(b"\r\n").split(b";")[0], 16):
                out += self.exactly(size + 2)[:-2]
            self.until(b"\r\n")  # no trailers
            return bytes(out)
        if "content-length" in headers:
            return self.exactly(int(headers["content-length"]))
        raise ValueError("response has neither Content-Length nor chunked framing")


def one_request(sock: socket.socket, reader: Reader, request: bytes, expect: bytes) -> float:
    """Send one request, return its TTFB in ms; ValueError when the response is not the fixture."""
    sock.sendall(request)
    t0 = time.perf_counter()
    head = reader.until(b"\r\n\r\n")
    while not reader.buf:
        reader.fill()
    ttfb = (time.perf_counter() - t0) * 1000
    status = head.split(b" ", 2)[1]
    body = reader.body(head)
    if status != b"200":
        raise ValueError(f"HTTP {status.decode()}: {body[:200]!r}")
    if body != expect:
        raise ValueError(f"body differs from the fixture ({len(body)} bytes, expected {len(expect)})")
    return ttfb


def measure_ttfb(
    contender: Contender, cell: Cell, expect: bytes, requests: int, warmup: int, quiet_timeout: float
) -> TtfbResult:
    """`warmup` unmeasured then `requests` measured sequential requests, one keep-alive connection."""
    result = TtfbResult(contender.name)
    request = raw_request(contender, cell)
    sock: socket.socket | None = None
    reader: Reader | None = None
    wait_quiet(quiet_timeout)
    with pinned(LOAD_CPU):
        try:
            for i in range(warmup + requests):
                if sock is None or reader is None:
                    sock = socket.create_connection(("127.0.0.1", contender.port), timeout=30)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    reader = Reader(sock)
                try:
                    ms = one_request(sock, reader, request, expect)
                except (OSError, ValueError) as exc:
                    result.errors += 1
                    result.first_error = result.first_error or repr(exc)[:200]
                    sock.close()
                    sock = reader = None
                    if result.errors >= 10 and not result.samples_ms:
                        break  # it does not work at all
                    continue
                if i >= warmup:
                    result.samples_ms.append(ms)
        finally:
            if sock is not None:
                sock.close()
    return result


def print_ttfb(r: TtfbResult) -> None:
    errors = f"  errors {r.errors} (first: {r.first_error})" if r.errors else ""
    print(
        f"  ttfb anthropic_sse@1  {len(r.samples_ms):>5} requests  median {r.median_ms:6.3f} ms"
        f"  p99 {r.p99_ms:6.3f} ms{errors}",
        flush=True,
    )


def render_ttfb(results: list[TtfbResult], requests: int, warmup: int) -> list[str]:
    """The report section: TTFB per contender, the gateway's difference to bare-raw, the target line."""
    if not results:
        return []
    lines = [
        "",
        "## Time to first byte: Anthropic SSE, 1 connection",
        "",
        f"{requests} sequential streaming requests per contender on one keep-alive connection (after {warmup} "
        f"unmeasured), from a raw-socket Python client pinned to CPU {LOAD_CPU}: time from the request sent to "
        "the first byte of the response body. Every body is read to its end and checked byte-identical to the "
        "fixture.",
        "",
        "| Contender | Requests | median ms | p99 ms | Errors |",
        "|---|---|---|---|---|",
    ]
    by = {r.contender: r for r in results}
    for name in TTFB_CONTENDERS:
        r = by.get(name)
        if r:
            errors = f"{r.errors} ({r.first_error[:60]})" if r.errors else "0"
            lines.append(f"| {name} | {len(r.samples_ms)} | {r.median_ms:.3f} | {r.p99_ms:.3f} | {errors} |")
    lines.append("")
    gw, bare = by.get("gateway"), by.get("bare-raw")
    if not (gw and bare and gw.samples_ms and bare.samples_ms):
        lines.append(f"- TTFB added ≤ {TARGET_TTFB_MS:g} ms: not measured (needs the gateway and bare-raw)")
        return lines
    added = gw.median_ms - bare.median_ms
    lines.append(f"- gateway - bare-raw: median {added:+.3f} ms, p99 {gw.p99_ms - bare.p99_ms:+.3f} ms")
    flag = "PASS" if added <= TARGET_TTFB_MS and not gw.errors else "FAIL"
    lines.append(f"- TTFB added ≤ {TARGET_TTFB_MS:g} ms (gateway - bare-raw, median {added:+.3f} ms): {flag}")
    return lines
