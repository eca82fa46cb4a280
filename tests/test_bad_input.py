"""Bad input to the settings, the CLI, the admin API and the dashboard: a clear error, never a 500."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import ConfigError, Settings, settings_from_env
from tests.conftest import ADMIN_TOKEN, run_cli
from tests.support_db import Databases

CONFIG = str(Path(__file__).resolve().parent.parent / "config" / "gateway.toml")
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
NAME_REFUSED = "name must be at most 200 characters, without control characters"
# Names shown in HTML, the CLI's listing and logs: too long, or holding what garbles or forges what is shown.
BAD_NAMES = ["x" * 201, "web\nkey_0123 alice revoked", "\x1b[2Jweb", "a\u0085b", "a\u2028b", "\u202egnp.exe"]


def _client(url: str, tmp_path: Path) -> TestClient:
    settings = Settings(database_url=url, journal_dir=str(tmp_path / "journal"), admin_token=ADMIN_TOKEN)
    return TestClient(create_app(settings), base_url="http://gw", raise_server_exceptions=False, follow_redirects=False)


@pytest.fixture
def sqlite_client(tmp_path: Path) -> Iterator[TestClient]:
    with _client(f"sqlite:///{tmp_path}/gw.db", tmp_path) as client:
        yield client


@pytest.fixture
def pg_client(tmp_path: Path, databases: Databases) -> Iterator[TestClient]:
    with _client(databases.new(backend="postgres").url, tmp_path) as client:
        yield client


# --- settings: NaN (and other non-finite / out-of-range numbers) must be a ConfigError ---


@pytest.mark.parametrize(
    "var",
    [
        "GATEWAY_SYNC_INTERVAL_SECONDS",
        "GATEWAY_RECORD_LINGER_SECONDS",
        "GATEWAY_UPSTREAM_TIMEOUT_SECONDS",
        "GATEWAY_LEASE_FRACTION",
        "GATEWAY_HEARTBEAT_STALE_SECONDS",
        "GATEWAY_DRAIN_TIMEOUT_SECONDS",
    ],
)
def test_nan_float_setting_is_a_config_error(var: str) -> None:
    with pytest.raises(ConfigError, match=var):
        settings_from_env({var: "nan", "GATEWAY_CONFIG": CONFIG})


@pytest.mark.parametrize("value", ["0", "nan", "inf"])
def test_a_store_timeout_must_be_a_positive_number(value: str) -> None:
    with pytest.raises(ConfigError, match="GATEWAY_STORE_TIMEOUT_SECONDS must be a positive number"):
        settings_from_env({"GATEWAY_STORE_TIMEOUT_SECONDS": value, "GATEWAY_CONFIG": CONFIG})
    assert (
        settings_from_env({"GATEWAY_STORE_TIMEOUT_SECONDS": "0.5", "GATEWAY_CONFIG": CONFIG}).store_timeout_seconds
        == 0.5
    )


@pytest.mark.parametrize(
    "var",
    [
        # aiohttp takes a 0 timeout for none: a provider that never answers would hold the request for ever
        "GATEWAY_UPSTREAM_TIMEOUT_SECONDS",
        "GATEWAY_CONNECT_TIMEOUT_SECONDS",
        # a 0 period is a busy loop against the store or Polar
        "GATEWAY_REFUSALS_FLUSH_SECONDS",
        "GATEWAY_SYNC_INTERVAL_SECONDS",
        "GATEWAY_SYNC_BACKOFF_SECONDS",
        "GATEWAY_SYNC_BACKOFF_MAX_SECONDS",
        "GATEWAY_KEEPER_POLL_SECONDS",
        "GATEWAY_HEARTBEAT_SECONDS",  # (with a 0 staleness, every live process would be taken for dead)
    ],
)
def test_a_zero_timeout_or_period_is_a_config_error(var: str) -> None:
    env = {var: "0", "GATEWAY_HEARTBEAT_STALE_SECONDS": "0", "GATEWAY_CONFIG": CONFIG}
    if var != "GATEWAY_HEARTBEAT_SECONDS":
        env.pop("GATEWAY_HEARTBEAT_STALE_SECONDS")
    with pytest.raises(ConfigError, match=f"^{var} must be a positive number, got '0'$"):
        settings_from_env(env)


@pytest.mark.parametrize(
    ("var", "url"),
    [
        ("GATEWAY_DATABASE_URL", "postgresql://gw:s3cret@db:5432x/gw"),  # `gateway serve`: a traceback
        ("GATEWAY_REDIS_URL", "redis://:s3cret@127.0.0.1:abc/0"),  # a traceback
        ("GATEWAY_ANTHROPIC_UPSTREAM", "https://api.anthropic.com:99999"),  # a 502 for every request
        ("GATEWAY_GEMINI_UPSTREAM", "http://127.0.0.1:port"),
    ],
)
def test_a_url_with_a_bad_port_is_a_config_error(var: str, url: str) -> None:
    with pytest.raises(ConfigError, match=f"^{var} has an invalid port") as err:
        settings_from_env({var: url, "GATEWAY_CONFIG": CONFIG})
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize("url", ["polar.example.com", "ftp://polar.example.com", "http://127.0.0.1:abc"])
def test_a_polar_base_url_that_is_no_http_url_is_a_config_error(url: str) -> None:
    # (it was taken: every sync failed as a network error, or `gateway sync` ended in a traceback)
    env = {"POLAR_ACCESS_TOKEN": "polar_oat_x", "POLAR_BASE_URL": url, "GATEWAY_CONFIG": CONFIG}
    with pytest.raises(ConfigError, match=r"^POLAR_BASE_URL "):
        settings_from_env(env)


def test_port_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_PORT"):
        settings_from_env({"GATEWAY_PORT": "70000", "GATEWAY_CONFIG": CONFIG})


def test_upstream_url_without_a_host_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_ANTHROPIC_UPSTREAM"):
        settings_from_env({"GATEWAY_ANTHROPIC_UPSTREAM": "https://", "GATEWAY_CONFIG": CONFIG})


@pytest.mark.parametrize("content", [None, b"\xff\xfe[plan]\n"])
def test_unreadable_config_file_is_a_config_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "cfg"  # a directory, or a file that is not UTF-8
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        settings_from_env({"GATEWAY_CONFIG": str(path)})


def test_cli_with_a_directory_as_config_fails_with_one_line(tmp_path: Path) -> None:
    out = run_cli({"GATEWAY_CONFIG": str(tmp_path)}, "migrate", timeout=60)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("configuration error:"), out.stderr


# --- dashboard: a non-ASCII digit in a query parameter is a 500 ---


def test_dashboard_sync_page_with_a_unicode_digit_is_not_a_500(sqlite_client: TestClient) -> None:
    resp = sqlite_client.post("/admin/signin", data={"token": ADMIN_TOKEN})
    assert resp.status_code == 303
    resp = sqlite_client.get("/admin/sync", params={"requeued": "\u00b2"})  # '²'.isdigit() but int('²') fails
    assert resp.status_code == 200, resp.text


# --- PostgreSQL: a NUL character in admin input is a 500, not a 400/404 ---


def test_admin_key_name_with_nul_is_not_a_500_on_postgres(pg_client: TestClient) -> None:
    resp = pg_client.post("/admin/keys", headers=ADMIN, json={"user_id": "alice", "name": "a\u0000b"})
    assert (resp.status_code, resp.json()["error"]["message"]) == (400, NAME_REFUSED), resp.text


def test_admin_list_and_revoke_with_nul_are_not_500_on_postgres(pg_client: TestClient) -> None:
    listed = pg_client.get("/admin/keys", headers=ADMIN, params={"user_id": "\u0000"})
    assert (listed.status_code, listed.json()) == (200, {"data": []}), listed.text
    assert pg_client.delete("/admin/keys/%00", headers=ADMIN).status_code == 404


def test_dashboard_user_search_with_nul_is_not_a_500_on_postgres(pg_client: TestClient) -> None:
    assert pg_client.post("/admin/signin", data={"token": ADMIN_TOKEN}).status_code == 303
    resp = pg_client.get("/admin/users", params={"q": "\u0000"})
    assert resp.status_code == 200, resp.text


def test_dashboard_key_name_with_nul_is_not_a_500_on_postgres(pg_client: TestClient) -> None:
    assert pg_client.post("/admin/signin", data={"token": ADMIN_TOKEN}).status_code == 303
    csrf = re.search(r'name="csrf" value="([^"]+)"', pg_client.get("/admin/users/alice").text)
    assert csrf is not None
    resp = pg_client.post("/admin/users/alice/keys", data={"csrf": csrf.group(1), "name": "a\u0000b"})
    assert resp.status_code == 400 and NAME_REFUSED in resp.text, resp.text  # refused as by the admin API


# --- user ids '.' and '..' are not URL path segments (the Polar SDK does not encode path params) ---


@pytest.mark.parametrize("user_id", [".", ".."])
def test_dot_segment_user_ids_are_refused(sqlite_client: TestClient, user_id: str) -> None:
    # `polar.valid_user_id` refuses them (customers/external/../state is another Polar endpoint), so a
    # key issued for one has a user Polar calls can never be made for (`keys create --email` crashes).
    resp = sqlite_client.post("/admin/keys", headers=ADMIN, json={"user_id": user_id})
    assert resp.status_code == 400, resp.text


# --- key names: bounded and without control characters, alike in the admin API, the dashboard and the CLI ---


@pytest.mark.parametrize("name", BAD_NAMES)
def test_admin_api_refuses_a_long_or_control_character_key_name(sqlite_client: TestClient, name: str) -> None:
    resp = sqlite_client.post("/admin/keys", headers=ADMIN, json={"user_id": "alice", "name": name})
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"error": {"type": "invalid_request", "message": NAME_REFUSED}}
    assert sqlite_client.get("/admin/keys", headers=ADMIN).json() == {"data": []}


def test_admin_api_takes_a_name_of_200_characters_with_unicode(sqlite_client: TestClient) -> None:
    name = "clé \u2013 🔑 " + "x" * 192
    assert len(name) == 200
    resp = sqlite_client.post("/admin/keys", headers=ADMIN, json={"user_id": "alice", "name": name})
    assert (resp.status_code, resp.json()["name"]) == (201, name), resp.text


@pytest.mark.parametrize("name", BAD_NAMES)
def test_dashboard_refuses_a_long_or_control_character_key_name(sqlite_client: TestClient, name: str) -> None:
    assert sqlite_client.post("/admin/signin", data={"token": ADMIN_TOKEN}).status_code == 303
    page = sqlite_client.get("/admin/users/alice").text
    assert 'maxlength="200"' in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    resp = sqlite_client.post("/admin/users/alice/keys", data={"csrf": csrf.group(1), "name": name})
    assert resp.status_code == 400 and NAME_REFUSED in resp.text, resp.text
    assert sqlite_client.get("/admin/keys", headers=ADMIN).json() == {"data": []}


def test_cli_refuses_a_long_or_control_character_key_name(tmp_path: Path) -> None:
    env = {"GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path}/gw.db", "GATEWAY_CONFIG": CONFIG}
    for name in (BAD_NAMES[0], BAD_NAMES[1]):
        done = run_cli(env, "keys", "create", "--user", "alice", "--name", name, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", f"error: {NAME_REFUSED}\n")
    assert run_cli(env, "keys", "list", "--json", timeout=60).stdout.strip() == "[]"
