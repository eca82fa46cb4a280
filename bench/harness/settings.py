"""Constants of the speed benchmark: paths, CPU pinning, contenders, slow-mode timing, targets."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
BENCH = ROOT / "bench"
FIXTURES = ROOT / "tests" / "fixtures"
NGINX_MODULES = Path("/usr/lib/nginx/modules")
ECHO_MODULE = NGINX_MODULES / "ngx_http_echo_module.so"  # fast mode: echo + echo_flush per event
NDK_MODULE = NGINX_MODULES / "ndk_http_module.so"  # slow mode: Lua timing (needs ndk first)
LUA_MODULE = NGINX_MODULES / "ngx_http_lua_module.so"
APT_PACKAGES = ("nginx", "libnginx-mod-http-echo", "libnginx-mod-http-lua", "wrk")

CONTENDER_CPU = "0"
LOAD_CPU = "1"

BARE = ("bare-starlette", "bare-raw")
# The gateway variants: (PostgreSQL store, workers, Redis for the rate limits). `gateway` is one
# worker on SQLite, the reference; the -redis ones are opt-in (--contenders).
GATEWAYS = {
    "gateway": (False, 1, False),
    "gateway-pg": (True, 1, False),
    "gateway-w2": (False, 2, False),
    "gateway-pg-redis": (True, 1, True),
    "gateway-w2-redis": (False, 2, True),
}
# bare-raw with `--workers 2` on both CPUs: what a second core buys a pass-through with no billing at
# all on this machine, the ceiling against which the gateway's two workers / one is read.
BARE_W2 = "bare-raw-w2"
CONTENDERS = ("direct", *BARE, BARE_W2, *GATEWAYS)
DEFAULT_CONTENDERS = ("direct", *BARE, BARE_W2, "gateway", "gateway-pg", "gateway-w2")
REDIS_URL = "redis://127.0.0.1:6379/0"
# Two workers get both CPUs (the kernel spreads them); wrk and the upstream stay on LOAD_CPU and share it.
BOTH_CPUS = "0,1"

# gateway-pg: a fresh database on the local PostgreSQL server, dropped after the run.
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

# Slow-upstream mode: JSON after 250 ms; streams of 31 events 20 ms apart.
SLOW_JSON_DELAY = 0.25
SLOW_EVENTS = 31
SLOW_EVENT_GAP = 0.02
SLOW_CONNECTIONS = 256

# Targets from the performance issue.
TARGET_RATIO = 0.7
TARGET_P99_MS = 30.0
TARGET_MAX_MS = 200.0  # max latency at 16 connections
TARGET_RSS_MB = 120.0
TARGET_SLOW = 0.95
# From the scaling issue: two workers over one, PostgreSQL over SQLite (both on the same CPU budget).
TARGET_WORKERS = 1.6
TARGET_PG = 0.75

# A cell is flagged when other processes (or the hypervisor) took more than this share of a CPU.
FOREIGN_LIMIT = 0.05

# Time to first byte of Anthropic SSE at 1 connection (fast mode): the relay's added latency.
TTFB_CONTENDERS = ("direct", "bare-raw", "gateway")
TTFB_REQUESTS = 2000  # --quick: TTFB_REQUESTS_QUICK
TTFB_REQUESTS_QUICK = 500
TTFB_WARMUP = 100
TARGET_TTFB_MS = 1.0

# Cancel burst (slow mode, Anthropic SSE cell): rate before and after callers hang up mid-stream.
CANCEL_CONTENDERS = ("bare-raw", "gateway")
CANCEL_BURST = 256  # streaming requests that disconnect after the first event
CANCEL_WINDOW = 5.0  # seconds measured before and after
CANCEL_WINDOW_QUICK = 3.0
TARGET_CANCEL = 0.95
