"""Durable storage behind one interface (see `base.Store`)."""

from gateway.store.base import (
    ApiKey,
    CustomerLimits,
    MeterLimit,
    PendingEvent,
    RequestRecord,
    Store,
    UsageEvent,
    UsageSummaryRow,
)

__all__ = [
    "ApiKey",
    "CustomerLimits",
    "MeterLimit",
    "PendingEvent",
    "RequestRecord",
    "Store",
    "UsageEvent",
    "UsageSummaryRow",
]
