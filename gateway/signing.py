"""HMAC-SHA256 signatures for the gateway's stateless tokens (status tokens, dashboard sessions)."""

from __future__ import annotations

import base64
import hashlib
import hmac


def b64(data: bytes) -> str:
    """URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_key(secret: str, label: bytes) -> bytes:
    """A key of its own for one use of `secret` (the secret itself is never a MAC key)."""
    return hmac.new(secret.encode(), label, hashlib.sha256).digest()


def sign(key: bytes, text: str) -> str:
    return b64(hmac.new(key, text.encode(), hashlib.sha256).digest())


def signed(key: bytes, text: str, mac: str) -> bool:
    """Whether `mac` is `text`'s signature under `key` (compared in constant time)."""
    return hmac.compare_digest(mac.encode(), sign(key, text).encode())
