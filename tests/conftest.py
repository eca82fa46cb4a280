"""Shared fixtures: a fake upstream, and the real gateway app served by uvicorn over loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop

from gateway.app import create_app
from gateway.server import server_config
from gateway.settings import FileConfig, RateLimitConfig, ReservationConfig, Settings
from gateway.store import Store
from tests.fakes.polar import FakePolar
from tests.fakes.upstream import FakeUpstream
from tests.support_db import TEST_DATABASE, Database, Databases, PgServer, open_store

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token"
ANTHROPIC_KEY = "sk-ant-REAL-PROVIDER-KEY"
REDIS_URL = "redis://127.0.0.1:6379/0"  # shared with other test runs: use a random key prefix or user id
GEMINI_KEY = "AIza-REAL-PROVIDER-KEY"


def fixture_bytes(relpath: str) -> bytes:
    return (FIXTURES / relpath).read_bytes()


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll until `predicate()` is truthy; the deadline makes a missed condition fail, not hang."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


async def poll_until(predicate: Callable[[], Any], within: float = 5.0) -> Any:
    """`wait_until` from a test's event loop, for a plain predicate (what a background task changes)."""

    async def check() -> Any:
        return predicate()

    return await wait_until_async(check, within)


async def wait_until_async(predicate: Callable[[], Awaitable[Any]], within: float = 5.0, interval: float = 0.01) -> Any:
    """`wait_until` for a coroutine predicate (`within` seconds), without blocking the event loop."""
    deadline = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


class BodyCounter:
    """An ASGI wrapper counting the request body bytes its app read (to see whether an endpoint stopped early)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.read = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def counted() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            self.read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def raw_request(url: str, head: bytes, timeout: float = 10.0) -> bytes:
    """Send `head` (a request line and headers, maybe a partial body) over a raw socket; the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def stream_and_leave(url: str, key: str, body: object) -> bytes:
    """POST a streaming Anthropic request over a raw socket, read the first bytes and close: a client
    that leaves mid-stream. Returns what it read."""
    payload = httpx.Request("POST", f"{url}/anthropic/v1/messages", json=body).content
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /anthropic/v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"x-api-key: {key}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        return sock.recv(65536)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class ServerThread:
    """Runs the gateway app under uvicorn as `gateway serve` configures it, in a background thread."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(server_config(app, settings))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        loop = uvloop.new_event_loop()
        try:
            loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        finally:
            loop.close()

    def start(self) -> None:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout=10)
        if not self.server.started:
            raise RuntimeError("gateway failed to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@dataclasses.dataclass
class Gateway:
    url: str
    settings: Settings
    db: Database
    server: ServerThread
    app: Any

    @property
    def services(self) -> Any:
        return self.app.services

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)

    def issue_key(self, user_id: str, name: str = "") -> str:
        with self.admin() as client:
            resp = client.post("/admin/keys", json={"user_id": user_id, "name": name})
            assert resp.status_code == 201, resp.text
            return str(resp.json()["key"])

    def meter(self, key: str, name: str) -> dict[str, Any]:
        """One meter of `GET /api/billing/status` for the holder of `key`."""
        resp = httpx.get(f"{self.url}/api/billing/status", headers={"authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text
        return next(m for m in resp.json()["meters"] if m["name"] == name)

    def status_token(self, user_id: str, ttl_seconds: int = 900) -> str:
        with self.admin() as client:
            resp = client.post("/admin/status-tokens", json={"user_id": user_id, "ttl_seconds": ttl_seconds})
            assert resp.status_code == 201, resp.text
            return str(resp.json()["token"])

    def assert_portal(self, polar: FakePolar, credential: str, return_url: str) -> None:
        """The portal link for a bearer `credential` is the customer session the fake Polar made."""
        resp = httpx.get(
            f"{self.url}/api/billing/portal",
            params={"return_url": return_url},
            headers={"authorization": f"Bearer {credential}"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"url": polar.sessions[-1]["customer_portal_url"]}
        assert polar.sessions[-1]["return_url"] == return_url

    @property
    def db_path(self) -> Path:
        """The SQLite file (a test reading it is skipped on PostgreSQL)."""
        return self.db.path

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.db.query(sql, *params)

    def events(self, user_id: str) -> dict[str, int]:
        return self.db.usage(user_id)

    def requests(self, user_id: str) -> list[dict[str, Any]]:
        return self.db.dicts("SELECT * FROM requests WHERE user_id = ? ORDER BY started_at", user_id)

    def wait_recorded(self, user_id: str, n: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The response reaches the client before its record is stored (the recorder batches): poll for it."""

        def done() -> list[dict[str, Any]] | None:
            rows = self.requests(user_id)
            return rows if len(rows) >= n else None

        return wait_until(done, timeout)  # type: ignore[no-any-return]


@pytest.fixture
def fake() -> Iterator[FakePolar]:
    """A fake Polar API over loopback (the real polar-sdk talks to it)."""
    with FakePolar() as fp:
        yield fp


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    yield server
    server.drop()


@pytest.fixture
def databases(tmp_path: Path, pg_server: PgServer) -> Databases:
    """Fresh databases on the backend under test (GATEWAY_TEST_DATABASE)."""
    return Databases(tmp_path, pg_server)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module marked `both_backends` runs each test taking `db` (or `store`) on SQLite and PostgreSQL."""
    if "db" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_backends"):
        metafunc.parametrize("db", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def db(request: pytest.FixtureRequest, databases: Databases) -> Database:
    """A fresh database on the backend under test (or the one `both_backends` parametrizes)."""
    return databases.new(backend=getattr(request, "param", TEST_DATABASE))


@pytest.fixture
async def store(db: Database) -> AsyncIterator[Store]:
    s = await open_store(db.url)
    yield s
    await s.close()


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def make_gateway(tmp_path: Path, upstream: FakeUpstream, databases: Databases) -> Iterator[Callable[..., Gateway]]:
    upstream.reset()
    started: list[Gateway] = []

    def make(
        plan: dict[str, int] | None = None,
        rate_limit: RateLimitConfig | None = None,
        reservation: ReservationConfig | None = None,
        shared: bool = False,
        **overrides: Any,
    ) -> Gateway:
        db = databases.new(f"gateway-{len(started)}")
        file = FileConfig(
            plan=plan or {},
            rate_limit=rate_limit or RateLimitConfig(requests_per_minute=None, tokens_per_minute=None),
            reservation=reservation or ReservationConfig(),
        )
        values: dict[str, Any] = {
            "database_url": db.url,
            "journal_dir": str(tmp_path / f"gateway-{len(started)}.db.journal"),
            "anthropic_api_key": ANTHROPIC_KEY,
            "gemini_api_key": GEMINI_KEY,
            "anthropic_upstream": upstream.url,
            "gemini_upstream": upstream.url,
            "admin_token": ADMIN_TOKEN,
            "file": file,
        }
        settings = Settings(**{**values, **overrides})
        app = create_app(settings, shared=shared)
        server = ServerThread(app, settings)
        server.start()
        # (the database of the settings: a test may point several gateways at one)
        gw = Gateway(f"http://127.0.0.1:{server.port}", settings, Database(settings.database_url), server, app)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.server.stop()


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env(db: Database | Path, upstream: FakeUpstream, **extra: str) -> dict[str, str]:
    """Environment of a `gateway serve` subprocess on `db` (a SQLite path or a test database) in
    front of the fake upstream."""
    return {
        "GATEWAY_DATABASE_URL": db.url if isinstance(db, Database) else f"sqlite:///{db}",
        "GATEWAY_ANTHROPIC_UPSTREAM": upstream.url,
        "GATEWAY_GEMINI_UPSTREAM": upstream.url,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "GEMINI_API_KEY": "g",
        "GATEWAY_ADMIN_TOKEN": "adm",
        **extra,
    }


def run_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` as a real process, with `env` over this one's (one that does not end
    within `timeout` seconds fails the test instead of hanging it)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


class GatewayProcess:
    """`python -m gateway serve` as a real process, for kill -9 and restart tests."""

    def __init__(self, env: dict[str, str], port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.args = args  # after `serve`, e.g. ("--workers", "3")
        self.port = port or free_port()
        self.env = {**os.environ, **env, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(self.port)}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        return self.launch().wait_healthy()

    def launch(self) -> GatewayProcess:
        """Start the process without waiting (start several at once, then `wait_healthy` each)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", *self.args],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        return self

    def wait_healthy(self) -> GatewayProcess:

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=60, interval=0.05)
        return self

    def issue_key(self, user_id: str) -> str:
        """A key through the admin API (the env must set GATEWAY_ADMIN_TOKEN=adm)."""
        resp = httpx.post(f"{self.url}/admin/keys", json={"user_id": user_id}, headers={"authorization": "Bearer adm"})
        assert resp.status_code == 201, resp.text
        return str(resp.json()["key"])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
