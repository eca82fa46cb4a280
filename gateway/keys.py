"""Gateway keys: generated once, shown once, stored only as a SHA-256 hash.

Keys carry 256 random bits, so a plain (unsalted) hash is safe to store and lets the
lookup be an indexed equality; the final comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from gateway.store.base import ApiKey, KeyStore

KEY_PREFIX = "pgw_"
USER_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class InvalidUserId(ValueError):
    pass


def check_user_id(user_id: str) -> str:
    """User ids become Polar external customer ids and URL path segments: keep them URL-safe."""
    if not USER_ID_RE.fullmatch(user_id) or user_id in (".", ".."):
        raise InvalidUserId(
            f"invalid user id {user_id!r}: use 1-128 characters from A-Z a-z 0-9 _ . - (it is the Polar external id)"
        )
    return user_id


KEY_NAME_MAX = 200  # characters


class InvalidKeyName(ValueError):
    pass


# Control characters (Unicode Cc), line and paragraph separators, and the bidirectional controls
# (invisible, they reorder the text after them where a name is shown). Also the OpenAPI pattern.
KEY_NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]*$"
_KEY_NAME_RE = re.compile(KEY_NAME_PATTERN)


def check_key_name(name: str) -> str:
    """A key's label is shown in the dashboard, the CLI's listing and the admin API: bounded, and
    without control characters (NUL, which PostgreSQL refuses, line breaks, terminal escapes, bidi
    overrides) that would garble or forge what is shown beside it."""
    if len(name) > KEY_NAME_MAX or not _KEY_NAME_RE.fullmatch(name):
        raise InvalidKeyName(f"name must be at most {KEY_NAME_MAX} characters, without control characters")
    return name


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: str  # the secret, shown once
    record: ApiKey


async def issue_key(store: KeyStore, user_id: str, name: str = "") -> IssuedKey:
    check_user_id(user_id)
    check_key_name(name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(8)
    record = await store.create_key(key_id, user_id, name, key[:12], hash_key(key))
    return IssuedKey(key=key, record=record)


@dataclass(frozen=True, slots=True)
class Identity:
    key_id: str
    user_id: str


class KeyCache:
    """Authenticates keys with a short positive cache.

    A revocation evicts at once: made through this process (admin API), directly; through another
    process or the CLI, when the invalidation log reports it (`LeaseKeeper`), and within `ttl`
    seconds at the latest should that report fail.
    """

    def __init__(self, store: KeyStore, ttl: float = 1.0, max_entries: int = 100_000) -> None:
        self._store = store
        self._ttl = ttl
        self._max = max_entries
        self._cache: dict[bytes, tuple[Identity, float]] = {}
        self._evictions = 0  # a lookup that overlapped an eviction does not cache what it read

    @staticmethod
    def _digest(key: str | None) -> bytes | None:
        """The hash a well-formed key is stored under; None for a key that cannot be one."""
        if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
            return None
        return hash_key(key)

    def cached(self, key: str | None) -> Identity | None:
        """The identity `authenticate` would return from the cache, without a coroutine; None when
        it would have to ask the store (or the key is malformed)."""
        digest = self._digest(key)
        hit = self._cache.get(digest) if digest is not None else None
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    async def authenticate(self, key: str | None) -> Identity | None:
        digest = self._digest(key)
        if digest is None:
            return None
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        evictions = self._evictions
        found = await self._store.find_key(digest)
        if found is None:
            self._cache.pop(digest, None)
            return None
        record, stored = found
        if not hmac.compare_digest(stored, digest) or record.revoked_at is not None:
            self._cache.pop(digest, None)
            return None
        ident = Identity(key_id=record.id, user_id=record.user_id)
        if evictions == self._evictions:
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[digest] = (ident, now + self._ttl)
        return ident

    def evict_key_id(self, key_id: str) -> None:
        self._evictions += 1
        for digest, (ident, _) in list(self._cache.items()):
            if ident.key_id == key_id:
                del self._cache[digest]
