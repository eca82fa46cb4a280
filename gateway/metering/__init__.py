"""Usage metering: pure extractors and incremental parsers fed beside the byte relay.

Nothing here touches the network or the relayed bytes; callers feed copies of chunks
and read `Usage` whenever they need it (also after a disconnect).
"""

from __future__ import annotations

from gateway.metering.anthropic import AnthropicStreamMeter, usage_from_message
from gateway.metering.decode import ContentDecoder
from gateway.metering.estimate import (
    claude_media,
    estimate_input_tokens,
    gemini_media,
    requested_max_output,
    wants_images,
)
from gateway.metering.gemini import (
    GeminiArrayMeter,
    GeminiSSEMeter,
    usage_from_predict,
    usage_from_response,
)
from gateway.metering.jsonarray import JSONArrayScanner
from gateway.metering.sse import SSEParser
from gateway.metering.usage import StreamMeter, Usage

__all__ = [
    "AnthropicStreamMeter",
    "ContentDecoder",
    "GeminiArrayMeter",
    "GeminiSSEMeter",
    "JSONArrayScanner",
    "SSEParser",
    "StreamMeter",
    "Usage",
    "claude_media",
    "estimate_input_tokens",
    "gemini_media",
    "requested_max_output",
    "usage_from_message",
    "usage_from_predict",
    "usage_from_response",
    "wants_images",
]
