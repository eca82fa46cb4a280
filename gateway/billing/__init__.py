"""Billing: what a request's quota and metering depend on, and the user-facing billing endpoints."""
