"""The gateway's own answers on provider routes (refusals, bad requests, an unreachable provider),
in the provider's error shape, so the official SDKs raise their usual errors."""

from __future__ import annotations

from typing import Any

from gateway.billing.owner import RefusalKind, Refused
from gateway.metering.estimate import CLAUDE_IMAGE_MAX_TOKENS, GEMINI_IMAGE_MAX_TOKENS
from gateway.meters import (
    CLAUDE_CACHE_READ,
    CLAUDE_CACHE_WRITE,
    CLAUDE_CACHE_WRITE_1H,
    CLAUDE_INPUT,
    CLAUDE_WEB_SEARCHES,
    GEMINI_CACHED,
    GEMINI_IMAGES,
    GEMINI_INPUT,
    GEMINI_OUTPUT,
)
from gateway.providers.base import Provider

PORTAL_PATH = "/api/billing/portal"
# What a client can change to fit a refused reservation, by meter (output meters: max_tokens).
_INPUT = (
    f"send less input (images reserve {CLAUDE_IMAGE_MAX_TOKENS:,} tokens each, documents [reservation]"
    " document_input_tokens, server tools such as web search [reservation] server_tool_input_tokens)"
)
_GEMINI_MEDIA = (
    f"send less input (inline images reserve {GEMINI_IMAGE_MAX_TOKENS:,} tokens each; files, audio, video, PDFs"
)
_GEMINI_TOOLS = (
    "[reservation] gemini_document_input_tokens; server tools such as Google Search and URL context"
    " [reservation] gemini_server_tool_input_tokens)"
)
_GEMINI_INPUT = f"{_GEMINI_MEDIA} {_GEMINI_TOOLS}"
_GEMINI_CACHED = f"{_GEMINI_MEDIA} and a cachedContent {_GEMINI_TOOLS}"
_LOWER = {
    CLAUDE_WEB_SEARCHES: "lower the web_search tool's max_uses",
    GEMINI_IMAGES: "ask for fewer images",
    **dict.fromkeys((CLAUDE_INPUT, CLAUDE_CACHE_WRITE, CLAUDE_CACHE_WRITE_1H, CLAUDE_CACHE_READ), _INPUT),
    GEMINI_INPUT: _GEMINI_INPUT,
    GEMINI_CACHED: _GEMINI_CACHED,
    # (a request without it reserves [reservation] gemini_max_output_tokens, the model's whole output limit)
    GEMINI_OUTPUT: "set a lower maxOutputTokens",
}
_COMPRESSED = "compressed request bodies (content-encoding) are not served by the gateway: send the JSON uncompressed"
# Without it the server keeps reading (and discarding) the rest of an oversized upload.
_CLOSE = [(b"connection", b"close")]


class ErrorAnswers:
    def __init__(self, provider: Provider, max_body_bytes: int) -> None:
        self.provider = provider
        self.max_body_bytes = max_body_bytes

    async def refusal(self, send: Any, refused: Refused, rid: tuple[bytes, bytes]) -> int:
        """The provider-shaped answer to a request billing would not begin."""
        if (limited := refused.rate) is not None:
            if limited.reason == "unavailable":
                message = f"rate limits cannot be checked right now; retry in {limited.retry_after} s"
            else:
                what = "requests" if limited.reason == "requests" else "tokens"
                message = (
                    f"rate limit exceeded: too many {what} per minute for this user; retry in {limited.retry_after} s"
                )
            return await self.error(
                send,
                429,
                "rate_limit_error",
                message,
                rid,
                extra_headers=[(b"retry-after", str(limited.retry_after).encode())],
            )
        if (refusal := refused.quota) is not None:
            if refusal.remaining <= 0:
                message = f"quota exhausted for meter {refusal.meter}; manage billing at {PORTAL_PATH}"
            else:
                lower = _LOWER.get(refusal.meter, "lower max_tokens")
                message = (
                    f"quota for meter {refusal.meter} has {refusal.remaining} left but this request may use up to "
                    f"{refusal.needed}; {lower} or manage billing at {PORTAL_PATH}"
                )
            return await self.error(
                send,
                402,
                "billing_error",
                message,
                rid,
                extra={"meter": refusal.meter, "portal_url": PORTAL_PATH},
                extra_headers=[(b"x-should-retry", b"false")],
            )
        if refused.kind is RefusalKind.STORE_UNAVAILABLE:
            return await self.unavailable(send, "the gateway cannot check the quota right now", rid)
        return await self.error(send, 503, "api_error", "the gateway cannot record usage right now", rid)

    async def unavailable(self, send: Any, what: str, rid: tuple[bytes, bytes]) -> int:
        """The database failed or did not answer in time: a 503 the SDKs retry after a second."""
        return await self.error(
            send, 503, "api_error", f"{what}; retry in 1 s", rid, extra_headers=[(b"retry-after", b"1")]
        )

    async def error(
        self,
        send: Any,
        status: int,
        kind: str,
        message: str,
        rid: tuple[bytes, bytes],
        extra: dict[str, Any] | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> int:
        """Answer with the provider-shaped error; returns `status`."""
        body = self.provider.error_body(status, kind, message, extra)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            rid,
            *(extra_headers or ()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return status

    async def compressed(self, send: Any, rid: tuple[bytes, bytes]) -> int:
        return await self.error(send, 400, "invalid_request_error", _COMPRESSED, rid)

    async def too_large(self, send: Any, rid: tuple[bytes, bytes]) -> int:
        message = f"request body exceeds the gateway limit of {self.max_body_bytes} bytes"
        return await self.error(send, 413, "request_too_large", message, rid, extra_headers=_CLOSE)
