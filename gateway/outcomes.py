"""How a request ended, as stored on its record (the strings are part of the stored data)."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    OK = "ok"
    UPSTREAM_ERROR = "upstream_error"  # the provider answered with an error status
    UPSTREAM_ERROR_MIDSTREAM = "upstream_error_midstream"  # ... or with an error event inside a 200 stream
    TIMEOUT = "timeout"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_BROKEN = "upstream_broken"  # the connection broke mid-response
    CLIENT_DISCONNECTED = "client_disconnected"
    CRASHED = "crashed"  # settled at the next start from the journal, by estimate
    GATEWAY_ERROR = "gateway_error"  # the relay itself failed
    IN_FLIGHT = "in_flight"  # not finished yet
