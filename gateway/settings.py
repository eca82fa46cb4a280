"""Settings: one typed object read from the environment once, plus the TOML config file.

Secrets (provider keys, tokens) come only from the environment; the non-secret knobs
(plan allowances, rate limits, status thresholds, reservations) from `config/gateway.toml`.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.meters import ALL_METERS
from gateway.ratelimit.limiter import StoreErrorPolicy

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
METRICS_MODES = ("open", "admin", "off")


class ConfigError(Exception):
    """Bad configuration: the message is one clear line for the operator."""


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    requests_per_minute: int | None = 60
    tokens_per_minute: int | None = 400_000
    on_store_error: StoreErrorPolicy = StoreErrorPolicy.OPEN  # shared limits (Redis, the database) failing
    # GET /api/billing/portal per user: each creates a Polar customer session on the organisation's token,
    # whose Polar rate limit the usage sync shares.
    portal_sessions_per_minute: int = 5


@dataclass(frozen=True, slots=True)
class StatusConfig:
    warning: float = 0.75
    critical: float = 0.90


@dataclass(frozen=True, slots=True)
class ReservationConfig:
    default_max_output_tokens: int = 4096
    # Gemini output reserved for a request without maxOutputTokens: Google then lets the model write up to
    # its own output limit (65,536 on Gemini 2.5 and 3 models, thinking included), which 4,096 fell short of.
    gemini_max_output_tokens: int = 65_536
    images_per_request: int = 4
    web_searches_per_request: int = 10  # a Claude web search tool without max_uses (unlimited upstream)
    # Claude input reserved once for a request's documents (PDFs, files by id, documents by URL), whose
    # pages the gateway cannot count: at least the largest context window of the models served.
    document_input_tokens: int = 1_000_000
    # Gemini's likewise (files by URI, inline audio / video / PDF; a cachedContent as cached input): Gemini's
    # windows are not Claude's (1,048,576 tokens today, 2,097,152 on Pro models that had 2M).
    gemini_document_input_tokens: int = 2_097_152
    # Input reserved once for a request offering a server tool (Claude: web search, web fetch, code execution,
    # tool search, MCP servers, any typed tool not run by the client; Gemini: Google Search, code execution,
    # URL context, file search, Maps, any tool but function declarations and computer use): what it feeds back
    # is billed as input, bounded only by the context window. With documents, the larger ceiling once. Lower
    # values refuse fewer requests but let one that reads much more overshoot the quota.
    server_tool_input_tokens: int = 1_000_000
    gemini_server_tool_input_tokens: int = 2_097_152


@dataclass(frozen=True, slots=True)
class FileConfig:
    plan: dict[str, int] = field(default_factory=dict)  # meter -> allowance per period; absent = unlimited
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    reservation: ReservationConfig = field(default_factory=ReservationConfig)


def _section(cls: type, name: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in [{name}] (known: {', '.join(sorted(known))})")
        default = getattr(cls(), key)
        if isinstance(default, StrEnum):
            choices = [m.value for m in type(default)]
            if value not in choices:
                raise ConfigError(f"[{name}] {key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
            kwargs[key] = type(default)(value)
            continue
        want_float = isinstance(default, float)
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            if want_float
            else isinstance(value, int) and not isinstance(value, bool)
        )
        if not ok or value < 0:
            kind = "a non-negative number" if want_float else "a non-negative integer"
            raise ConfigError(f"[{name}] {key} must be {kind}, got {value!r}")
        kwargs[key] = float(value) if want_float else value
    return cls(**kwargs)


# The input ceilings reserved for what a request's body does not bound; none may be 0 (each costs tokens).
_CEILINGS = (
    ("document_input_tokens", "a document costs tokens"),
    ("gemini_document_input_tokens", "a document costs tokens"),
    ("server_tool_input_tokens", "a server tool's results cost tokens"),
    ("gemini_server_tool_input_tokens", "a server tool's results cost tokens"),
)


def parse_file_config(raw: Mapping[str, Any]) -> FileConfig:
    allowed = {"plan", "rate_limit", "status", "reservation"}
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"unknown section [{key}] (known: {', '.join(sorted(allowed))})")
    plan_raw = raw.get("plan", {})
    if not isinstance(plan_raw, dict):
        raise ConfigError("[plan] must be a table")
    plan: dict[str, int] = {}
    for meter, value in plan_raw.items():
        if meter not in ALL_METERS:
            raise ConfigError(f"unknown meter {meter!r} in [plan] (known: {', '.join(ALL_METERS)})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"[plan] {meter} must be a non-negative integer, got {value!r}")
        plan[meter] = value
    status = _section(StatusConfig, "status", raw.get("status", {}))
    if not 0 < status.warning <= status.critical <= 1:
        raise ConfigError("[status] needs 0 < warning <= critical <= 1")
    reservation = _section(ReservationConfig, "reservation", raw.get("reservation", {}))
    for name, why in _CEILINGS:
        if getattr(reservation, name) < 1:
            raise ConfigError(f"[reservation] {name} must be at least 1 ({why})")
    rate_limit = _section(RateLimitConfig, "rate_limit", raw.get("rate_limit", {}))
    if rate_limit.portal_sessions_per_minute < 1:
        raise ConfigError("[rate_limit] portal_sessions_per_minute must be at least 1")
    return FileConfig(
        plan=plan,
        rate_limit=rate_limit,
        status=status,
        reservation=reservation,
    )


def load_file_config(path: Path) -> FileConfig:
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (set GATEWAY_CONFIG)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file unreadable: {path}: {exc.strerror or exc}") from None
    try:
        return parse_file_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "sqlite:///gateway.db"
    database_pool_size: int = 10  # connections per process (PostgreSQL)
    # Longest a request waits on the database (key, quota, rate limit; the own API, the dashboard, webhooks): a 503.
    store_timeout_seconds: float = 5.0
    journal_dir: str = ""  # requests in flight (gateway/journal.py); "" = beside an SQLite database
    record_linger_seconds: float = 0.02  # how long finished requests gather before one store commit
    refusals_flush_seconds: float = 5.0  # how often refusals counted in memory are added to the store
    config_path: Path = Path("config/gateway.toml")
    host: str = "127.0.0.1"
    port: int = 8080
    anthropic_api_key: str = ""
    gemini_api_key: str = ""
    anthropic_upstream: str = "https://api.anthropic.com"
    gemini_upstream: str = "https://generativelanguage.googleapis.com"
    admin_token: str = ""
    status_token_secret: str = ""  # signs status tokens; "" = a key derived from admin_token
    cors_origins: str = ""  # comma-separated origins allowed to call the billing routes and the widget
    upstream_timeout_seconds: float = 600.0
    connect_timeout_seconds: float = 10.0
    max_body_bytes: int = 32 * 1024 * 1024
    drain_timeout_seconds: float = 120.0
    drain_max_bytes: int = 8 * 1024 * 1024
    log_format: str = "text"
    metrics: str = "admin"  # GET /metrics: "open", "admin" (behind the admin token) or "off"
    redis_url: str = ""  # shared rate limits in Redis; "" = in the database when shared, else in memory
    client_timeout_seconds: float = 30.0  # to receive a request's headers, and again its body
    max_connections: int = 4096  # open client connections; past it new ones get a 503
    # Polar
    polar_access_token: str = ""
    polar_organization_id: str = ""
    polar_environment: str = "sandbox"
    polar_webhook_secret: str = ""
    polar_base_url: str = ""
    sync_interval_seconds: float = 300.0
    sync_max_attempts: int = 3  # Polar rejecting the event itself (422); an outage only delays
    sync_backoff_seconds: float = 2.0  # first wait after an outage; doubles per failed pass
    sync_backoff_max_seconds: float = 300.0
    sync_batch_size: int = 500
    limits_max_age_seconds: float = 900.0
    webhook_retention_days: float = 30.0  # Polar delivery ids kept for deduplication, far beyond its retries
    # Several processes on one database (gateway/billing/leases.py, keeper.py)
    lease_fraction: float = 0.25  # a lease takes this share of what is unleased (at least the request's need)
    lease_idle_seconds: float = 5.0  # a user quiet this long: the idle part of its leases goes back
    lease_recall_wait_seconds: float = 1.5  # how long a short process waits for others to hand back idle leases
    keeper_poll_seconds: float = 0.05  # how often each process reads the invalidation log (recalls, limits, keys)
    heartbeat_seconds: float = 1.0
    heartbeat_stale_seconds: float = 10.0  # no heartbeat this long: the process is dead, its leases are released
    shared: bool = False  # other processes serve from this database (set for `--workers`; implied by PostgreSQL)
    secure_cookie: bool = False  # the dashboard's session cookie always Secure (behind a TLS proxy that says nothing)
    watchdog_seconds: float = 30.0  # a `--workers` worker whose event loop is stuck this long is replaced (0: never)
    file: FileConfig = field(default_factory=FileConfig)

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith(POSTGRES_SCHEMES)

    @property
    def is_shared(self) -> bool:
        """Whether other processes may serve from the same database (quota, limits and keys go through it)."""
        return self.shared or self.is_postgres

    @property
    def sqlite_path(self) -> str:
        return self.database_url.removeprefix("sqlite:///")

    @property
    def journal_path(self) -> Path | None:
        """None for an in-memory database: there is nothing durable to journal for."""
        if self.journal_dir:
            return Path(self.journal_dir)
        if self.is_postgres:
            return Path("gateway.journal")  # (in the working directory: the process's own disk)
        db = self.sqlite_path
        return None if db == ":memory:" else Path(db + ".journal")

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @property
    def polar_enabled(self) -> bool:
        return bool(self.polar_access_token)

    def __repr__(self) -> str:  # never print secrets
        return f"Settings(database_url={redact_url(self.database_url)!r}, host={self.host!r}, port={self.port})"


_ENV: dict[str, tuple[str, type]] = {
    "GATEWAY_DATABASE_URL": ("database_url", str),
    "GATEWAY_DATABASE_POOL_SIZE": ("database_pool_size", int),
    "GATEWAY_STORE_TIMEOUT_SECONDS": ("store_timeout_seconds", float),
    "GATEWAY_JOURNAL_DIR": ("journal_dir", str),
    "GATEWAY_RECORD_LINGER_SECONDS": ("record_linger_seconds", float),
    "GATEWAY_REFUSALS_FLUSH_SECONDS": ("refusals_flush_seconds", float),
    "GATEWAY_CONFIG": ("config_path", Path),
    "GATEWAY_HOST": ("host", str),
    "GATEWAY_PORT": ("port", int),
    "ANTHROPIC_API_KEY": ("anthropic_api_key", str),
    "GEMINI_API_KEY": ("gemini_api_key", str),
    "GATEWAY_ANTHROPIC_UPSTREAM": ("anthropic_upstream", str),
    "GATEWAY_GEMINI_UPSTREAM": ("gemini_upstream", str),
    "GATEWAY_ADMIN_TOKEN": ("admin_token", str),
    "GATEWAY_STATUS_TOKEN_SECRET": ("status_token_secret", str),
    "GATEWAY_CORS_ORIGINS": ("cors_origins", str),
    "GATEWAY_UPSTREAM_TIMEOUT_SECONDS": ("upstream_timeout_seconds", float),
    "GATEWAY_CONNECT_TIMEOUT_SECONDS": ("connect_timeout_seconds", float),
    "GATEWAY_MAX_BODY_BYTES": ("max_body_bytes", int),
    "GATEWAY_DRAIN_TIMEOUT_SECONDS": ("drain_timeout_seconds", float),
    "GATEWAY_DRAIN_MAX_BYTES": ("drain_max_bytes", int),
    "GATEWAY_LOG_FORMAT": ("log_format", str),
    "GATEWAY_METRICS": ("metrics", str),
    "GATEWAY_REDIS_URL": ("redis_url", str),
    "GATEWAY_CLIENT_TIMEOUT_SECONDS": ("client_timeout_seconds", float),
    "GATEWAY_MAX_CONNECTIONS": ("max_connections", int),
    "POLAR_ACCESS_TOKEN": ("polar_access_token", str),
    "POLAR_ORGANIZATION_ID": ("polar_organization_id", str),
    "POLAR_ENVIRONMENT": ("polar_environment", str),
    "POLAR_WEBHOOK_SECRET": ("polar_webhook_secret", str),
    "POLAR_BASE_URL": ("polar_base_url", str),
    "GATEWAY_SYNC_INTERVAL_SECONDS": ("sync_interval_seconds", float),
    "GATEWAY_SYNC_MAX_ATTEMPTS": ("sync_max_attempts", int),
    "GATEWAY_SYNC_BACKOFF_SECONDS": ("sync_backoff_seconds", float),
    "GATEWAY_SYNC_BACKOFF_MAX_SECONDS": ("sync_backoff_max_seconds", float),
    "GATEWAY_SYNC_BATCH_SIZE": ("sync_batch_size", int),
    "GATEWAY_LIMITS_MAX_AGE_SECONDS": ("limits_max_age_seconds", float),
    "GATEWAY_WEBHOOK_RETENTION_DAYS": ("webhook_retention_days", float),
    "GATEWAY_LEASE_FRACTION": ("lease_fraction", float),
    "GATEWAY_LEASE_IDLE_SECONDS": ("lease_idle_seconds", float),
    "GATEWAY_LEASE_RECALL_WAIT_SECONDS": ("lease_recall_wait_seconds", float),
    "GATEWAY_KEEPER_POLL_SECONDS": ("keeper_poll_seconds", float),
    "GATEWAY_HEARTBEAT_SECONDS": ("heartbeat_seconds", float),
    "GATEWAY_HEARTBEAT_STALE_SECONDS": ("heartbeat_stale_seconds", float),
    "GATEWAY_SHARED": ("shared", bool),
    "GATEWAY_WATCHDOG_SECONDS": ("watchdog_seconds", float),
    "GATEWAY_SECURE_COOKIE": ("secure_cookie", bool),
}

# Settings 0 is no value for: aiohttp takes a 0 timeout for none (a provider that never answers would hold
# its request for ever), and a 0 period turns its loop into a busy one against the store or Polar (with
# a 0 heartbeat, the staleness may be 0 too: every live process taken for dead).
_POSITIVE = (
    "GATEWAY_CLIENT_TIMEOUT_SECONDS",
    "GATEWAY_MAX_CONNECTIONS",
    "GATEWAY_STORE_TIMEOUT_SECONDS",
    "GATEWAY_UPSTREAM_TIMEOUT_SECONDS",
    "GATEWAY_CONNECT_TIMEOUT_SECONDS",
    "GATEWAY_REFUSALS_FLUSH_SECONDS",
    "GATEWAY_SYNC_INTERVAL_SECONDS",
    "GATEWAY_SYNC_BACKOFF_SECONDS",
    "GATEWAY_SYNC_BACKOFF_MAX_SECONDS",
    "GATEWAY_KEEPER_POLL_SECONDS",
    "GATEWAY_HEARTBEAT_SECONDS",
    "GATEWAY_WEBHOOK_RETENTION_DAYS",
)

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def redact_url(url: str) -> str:
    """The URL without its password (`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


def _bad_port(url: str) -> bool:
    """Whether the URL's port is not a number in 0-65535 (the drivers would fail on it later: a traceback
    at start, or a 502 for every request). A multi-host PostgreSQL URL (`h1:5432,h2:5433`) is the driver's."""
    parts = urlsplit(url)
    if "," in parts.netloc:
        return False
    try:
        return parts.port is not None and not 0 <= parts.port <= 65535
    except ValueError:  # (not a number, or out of range)
        return True


def _parse_bool(var: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{var} must be 1 or 0 (true or false), got {raw!r}")


def settings_from_env(env: Mapping[str, str] | None = None, *, load_file: bool = True) -> Settings:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for var, (attr, kind) in _ENV.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        try:
            value = _parse_bool(var, raw) if kind is bool else kind(raw)
        except ValueError:
            raise ConfigError(f"{var} must be {kind.__name__}, got {raw!r}") from None
        if kind in (int, float) and value < 0:
            raise ConfigError(f"{var} must not be negative, got {raw!r}")
        values[attr] = value
    settings = Settings(**values)
    if settings.polar_environment not in ("sandbox", "production"):
        raise ConfigError(f"POLAR_ENVIRONMENT must be 'sandbox' or 'production', got {settings.polar_environment!r}")
    if not settings.database_url.startswith(("sqlite:///", *POSTGRES_SCHEMES)):
        raise ConfigError("GATEWAY_DATABASE_URL must look like sqlite:///path/to.db or postgresql://user@host:5432/db")
    urls = {
        "GATEWAY_DATABASE_URL": settings.database_url,
        "GATEWAY_REDIS_URL": settings.redis_url,
        "GATEWAY_ANTHROPIC_UPSTREAM": settings.anthropic_upstream,
        "GATEWAY_GEMINI_UPSTREAM": settings.gemini_upstream,
        "POLAR_BASE_URL": settings.polar_base_url,
    }
    for var, url in urls.items():
        if _bad_port(url):  # (the message leaves the URL out: it may hold a password)
            raise ConfigError(f"{var} has an invalid port: use a number from 0 to 65535")
    if settings.port > 65535:
        raise ConfigError(f"GATEWAY_PORT must be 0-65535, got {settings.port}")
    if settings.database_pool_size < 1:
        raise ConfigError("GATEWAY_DATABASE_POOL_SIZE must be at least 1")
    if settings.redis_url and not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("GATEWAY_REDIS_URL must look like redis://host:6379/0 (or rediss://, unix://)")
    for var in _POSITIVE:
        if not 0 < getattr(settings, _ENV[var][0]) < math.inf:
            raise ConfigError(f"{var} must be a positive number, got {env.get(var)!r}")
    for origin in settings.cors_origin_list:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query):
            raise ConfigError(f"GATEWAY_CORS_ORIGINS: each origin must be * or http(s)://host[:port], got {origin!r}")
    if settings.lease_fraction > 1:
        raise ConfigError(f"GATEWAY_LEASE_FRACTION must be between 0 and 1, got {settings.lease_fraction}")
    if settings.heartbeat_stale_seconds < 3 * settings.heartbeat_seconds:
        raise ConfigError("GATEWAY_HEARTBEAT_STALE_SECONDS must be at least 3 x GATEWAY_HEARTBEAT_SECONDS")
    if not 0 <= settings.watchdog_seconds < math.inf:
        raise ConfigError(f"GATEWAY_WATCHDOG_SECONDS must be 0 (off) or seconds, got {settings.watchdog_seconds}")
    for var, (attr, kind) in _ENV.items():
        if kind is float and not math.isfinite(getattr(settings, attr)):
            raise ConfigError(f"{var} must be a finite number, got {env.get(var)!r}")
    if settings.log_format not in ("text", "json"):
        raise ConfigError("GATEWAY_LOG_FORMAT must be 'text' or 'json'")
    if settings.metrics not in METRICS_MODES:
        raise ConfigError(f"GATEWAY_METRICS must be one of {', '.join(METRICS_MODES)}, got {settings.metrics!r}")
    for var in ("GATEWAY_ANTHROPIC_UPSTREAM", "GATEWAY_GEMINI_UPSTREAM", "POLAR_BASE_URL"):
        url = urls[var]
        if var == "POLAR_BASE_URL" and not url:
            continue  # (Polar's own server)
        if not url.startswith(("http://", "https://")) or not urlsplit(url).hostname:
            raise ConfigError(f"{var} must be an http(s) URL, got {url!r}")
    if load_file:
        from dataclasses import replace

        settings = replace(settings, file=load_file_config(settings.config_path))
    return settings
