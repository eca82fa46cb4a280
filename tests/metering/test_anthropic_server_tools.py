"""What an Anthropic request reserves on the meters of cache writes with a 1h TTL and web searches."""

from __future__ import annotations

import orjson
import pytest

from gateway.metering.server_tools import requested_web_searches
from gateway.meters import CLAUDE_CACHE_WRITE, CLAUDE_CACHE_WRITE_1H, CLAUDE_INPUT, CLAUDE_WEB_SEARCHES
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import Route
from gateway.settings import ConfigError, ReservationConfig, parse_file_config

ROUTE = Route("messages", "/v1/messages", "", metered=True, has_body=True)
HI = [{"role": "user", "content": "hi"}]
SEARCH = {"type": "web_search_20250305", "name": "web_search"}
FETCH = {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 9}
CUSTOM = {"name": "web_search", "input_schema": {"type": "object"}}  # the client runs it: no charge


def reserve(tools: list[object] | None, unbounded: int = 7) -> dict[str, int]:
    obj: dict[str, object] = {"model": "claude-sonnet-4-6", "max_tokens": 16, "messages": HI}
    if tools is not None:
        obj["tools"] = tools
    body = orjson.dumps(obj)
    provider = AnthropicProvider("http://x", "k", 4096, 1_000_000, unbounded)
    return provider.prepare(ROUTE, body, orjson.loads(body)).reservation


def test_1h_cache_writes_are_reserved_like_all_cache_writes() -> None:
    # A plan may limit the 1h meter; it can hold at most the whole input, like every input meter.
    for tools in (None, [SEARCH]):
        r = reserve(tools)
        assert r[CLAUDE_CACHE_WRITE_1H] == r[CLAUDE_CACHE_WRITE] == r[CLAUDE_INPUT] > 0


@pytest.mark.parametrize(
    ("tools", "searches"),
    [
        ([{**SEARCH, "max_uses": 5}], 5),  # the API stops searching at max_uses
        ([SEARCH], 7),  # no max_uses: no limit upstream, so [reservation] web_searches_per_request
        ([{**SEARCH, "type": "web_search_20260209", "max_uses": 2}, FETCH, CUSTOM], 2),
        ([{**SEARCH, "max_uses": 2}, {**SEARCH, "max_uses": 3}], 5),
        ([{**SEARCH, "max_uses": "5"}], 7),  # not a cap the API takes (it refuses the request)
        ([{**SEARCH, "max_uses": True}], 7),
    ],
)
def test_web_searches_reserve_max_uses_or_the_configured_bound(tools: list[object], searches: int) -> None:
    assert reserve(tools)[CLAUDE_WEB_SEARCHES] == searches


@pytest.mark.parametrize("tools", [None, [], [FETCH, CUSTOM], [{**SEARCH, "max_uses": 0}], "junk", [None, 3]])
def test_requests_that_cannot_search_reserve_no_searches(tools: list[object] | None) -> None:
    # Absent rather than 0: a user out of searches may still send requests that cannot search.
    assert CLAUDE_WEB_SEARCHES not in reserve(tools)


def test_requested_web_searches() -> None:
    assert requested_web_searches({"tools": [SEARCH, {**SEARCH, "max_uses": 4}]}, 10) == 14
    assert requested_web_searches({"tools": [SEARCH]}, 0) == 0  # a bound of 0 reserves nothing
    assert requested_web_searches({"tools": {"type": "web_search_20250305"}}, 10) == 0
    assert requested_web_searches({}, 10) == 0


def test_config_takes_the_new_meters_and_the_search_bound() -> None:
    cfg = parse_file_config(
        {
            "plan": {"claude_web_searches": 100, "claude_cache_write_1h_tokens": 5000},
            "reservation": {"web_searches_per_request": 3},
        }
    )
    assert cfg.plan == {CLAUDE_WEB_SEARCHES: 100, CLAUDE_CACHE_WRITE_1H: 5000}
    assert cfg.reservation.web_searches_per_request == 3
    assert ReservationConfig().web_searches_per_request == 10
    with pytest.raises(ConfigError, match="web_searches_per_request must be a non-negative integer"):
        parse_file_config({"reservation": {"web_searches_per_request": -1}})
