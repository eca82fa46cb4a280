"""Usage events: what Polar receives for a request, derived from its usage whenever needed.

A request's `usage` ({meter: quantity}) is the one stored fact and its events are a pure
function of it, so the store keeps one row per request and the sync expands it. External ids
are derived from the request id (`<request id>:<meter>`; a COUNT meter gets one event of 1 per
unit, `<request id>:<meter>:<i>`), so a resend after any failure is deduplicated by Polar.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.meters import COUNT_METERS


def event_quantities(request_id: str, usage: Mapping[str, int]) -> list[tuple[str, str, int]]:
    """(external_id, meter, value) for each event of a request, in a stable order."""
    out: list[tuple[str, str, int]] = []
    for meter, value in sorted(usage.items()):
        if value <= 0:
            continue
        if meter in COUNT_METERS:
            out.extend((f"{request_id}:{meter}:{i}", meter, 1) for i in range(value))
        else:
            out.append((f"{request_id}:{meter}", meter, value))
    return out


def event_count(usage: Mapping[str, int]) -> int:
    n = 0  # a plain loop: twice per request, and a generator in sum() costs more than the counting
    for meter, value in usage.items():
        if value > 0:
            n += value if meter in COUNT_METERS else 1
    return n
