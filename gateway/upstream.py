"""The one shared upstream HTTP client (aiohttp), configured for a transparent proxy."""

from __future__ import annotations

import aiohttp


def create_client(connect_timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=0,  # no pool cap: slow streams must not queue behind each other
        keepalive_timeout=30,
        enable_cleanup_closed=True,
        ttl_dns_cache=300,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry one user's cookies to another's request
        auto_decompress=False,  # relay bodies compressed as received; the meter decodes a copy
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type", "Accept"),
        # No total timeout: streams may last longer than any fixed bound; reads are bounded per request.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
        raise_for_status=False,
    )
