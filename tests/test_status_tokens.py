"""Status tokens: signed, short-lived, bound to one user; anything else verifies to nothing."""

from __future__ import annotations

import base64

import pytest

from gateway.keys import KEY_PREFIX, InvalidUserId
from gateway.status_tokens import TOKEN_PREFIX, StatusTokens, signing_key


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


KEY = signing_key("s3cret", "")


def test_issued_token_verifies_to_its_user_until_it_expires() -> None:
    clock = Clock()
    tokens = StatusTokens(KEY, clock)
    issued = tokens.issue("alice", 60)
    assert issued.token.startswith("pgs_") and not issued.token.startswith(KEY_PREFIX)
    assert TOKEN_PREFIX != KEY_PREFIX
    assert issued.expires_at.timestamp() == 1_800_000_060
    assert tokens.verify(issued.token) == "alice"
    clock.now += 59.9
    assert tokens.verify(issued.token) == "alice"
    clock.now += 0.1
    assert tokens.verify(issued.token) is None


def test_default_ttl_is_fifteen_minutes() -> None:
    issued = StatusTokens(KEY, Clock()).issue("alice")
    assert issued.expires_at.timestamp() == 1_800_000_000 + 900


def test_ttl_and_user_id_are_validated() -> None:
    tokens = StatusTokens(KEY, Clock())
    for bad in (0, -1, 24 * 3600 + 1):
        with pytest.raises(ValueError, match="ttl_seconds"):
            tokens.issue("alice", bad)
    assert tokens.issue("alice", 24 * 3600).user_id == "alice"
    for user in ("", "a/b", "a:b", "x" * 129):
        with pytest.raises(InvalidUserId):
            tokens.issue(user, 60)


def test_every_single_character_change_is_refused() -> None:
    tokens = StatusTokens(KEY, Clock())
    token = tokens.issue("alice", 60).token
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for i in range(len(TOKEN_PREFIX), len(token)):
        for replacement in {alphabet[(alphabet.index(token[i]) + 1) % len(alphabet)], "A", "="}:
            if replacement != token[i]:
                assert tokens.verify(token[:i] + replacement + token[i + 1 :]) is None, (i, replacement)
    assert tokens.verify(token + "A") is None
    assert tokens.verify(token[:-1]) is None
    assert tokens.verify(token.replace("pgs_", "pgw_", 1)) is None


def test_other_secret_wrong_user_and_extended_expiry_are_refused() -> None:
    clock = Clock()
    tokens = StatusTokens(KEY, clock)
    token = tokens.issue("alice", 60).token
    assert StatusTokens(signing_key("other", ""), clock).verify(token) is None
    assert StatusTokens(signing_key("", "s3cret"), clock).verify(token) is None  # the admin-derived key differs

    payload, mac = token[len(TOKEN_PREFIX) :].split(".")
    expires, user = unb64(payload).decode().split(":")
    assert (expires, user) == ("1800000060", "alice")
    for forged in (f"{expires}:bob", f"{int(expires) + 3600}:alice", "9999999999:alice"):
        assert tokens.verify(f"{TOKEN_PREFIX}{b64(forged.encode())}.{mac}") is None
    # bob's genuine token does not become alice's with her payload
    bob_mac = tokens.issue("bob", 60).token.split(".")[1]
    assert tokens.verify(f"{TOKEN_PREFIX}{payload}.{bob_mac}") is None


def test_garbage_and_disabled_tokens_verify_to_nothing() -> None:
    tokens = StatusTokens(KEY, Clock())
    for junk in (None, "", "pgs_", "pgs_.", "pgs_a.b", "pgs_" + "A" * 500, "nope", "pgs_\u00e9.\u00e9"):
        assert tokens.verify(junk) is None
    disabled = StatusTokens(None)
    assert not disabled.enabled and disabled.verify(tokens.issue("alice").token) is None
    with pytest.raises(RuntimeError):
        disabled.issue("alice")


def test_signing_key_prefers_the_dedicated_secret_and_never_is_the_admin_token() -> None:
    assert signing_key("", "") is None
    derived = signing_key("", "admin")
    assert derived is not None and derived != b"admin" and len(derived) == 32
    assert signing_key("secret", "admin") == signing_key("secret", "") != derived
