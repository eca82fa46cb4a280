"""Rate limits in Redis: leases of the per-minute budget (gateway/ratelimit/lease.py), exact across
processes and machines.

A take is one Lua script (EVALSHA): it reads the user's hash of 1 s buckets (fields `r<second>`
requests, `t<second>` tokens), drops the buckets out of the window, sizes the slice as
`gateway.ratelimit.budget.slice_of` does (the script is its copy: keep the two alike) and books it,
atomically, on the Redis server's clock (TIME), so the processes' clocks do not matter. The key
expires after `ttl_seconds` without takes, so idle users vanish. Corrections go in the background.
The client never sends a take or a batch again (see `RedisRateLimiter`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.ratelimit.budget import SLICE, Correction, Grant, NotApplied, Want
from gateway.ratelimit.lease import LeasedRateLimiter
from gateway.ratelimit.limiter import WINDOW, RateLimited, StoreErrorPolicy

log = logging.getLogger("gateway.ratelimit")

MAX_CONNECTIONS = 100  # per process (redis-py's default)

# ARGV: rpm (-1: none), tpm (-1: none), requests, tokens, need, ttl ms, now ("": the server's TIME),
# then a lease's rest handed back first: its second ("": none), requests delta, tokens delta.
# Returns {0, second, now in microseconds, requests, tokens, room} a slice booked,
# {1, retry_after} too many requests, {2, retry_after} too many tokens.
_TAKE = f"""
local now
if ARGV[7] ~= '' then
  now = tonumber(ARGV[7])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
if ARGV[8] ~= '' and redis.call('HEXISTS', KEYS[1], 'r' .. ARGV[8]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'r' .. ARGV[8], ARGV[9])
  redis.call('HINCRBY', KEYS[1], 't' .. ARGV[8], ARGV[10])
end
local window, slice = {WINDOW}, {SLICE}
local second = math.floor(now)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local want_r, want_t, need = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local flat = redis.call('HGETALL', KEYS[1])
local secs, reqs, toks, stale = {{}}, {{}}, {{}}, {{}}
for i = 1, #flat, 2 do
  local field = flat[i]
  local s = tonumber(string.sub(field, 2))
  if s <= second - window then
    stale[#stale + 1] = field
  else
    if reqs[s] == nil then
      reqs[s] = 0
      toks[s] = 0
      secs[#secs + 1] = s
    end
    if string.sub(field, 1, 1) == 'r' then reqs[s] = tonumber(flat[i + 1]) else toks[s] = tonumber(flat[i + 1]) end
  end
end
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
table.sort(secs)
local used, spent = 0, 0
for _, s in ipairs(secs) do
  used = used + reqs[s]
  spent = spent + toks[s]
end
local function freed_at()
  local u, sp, at = used, spent, second
  for _, s in ipairs(secs) do
    if (rpm < 0 or u < rpm) and (tpm < 0 or need == 0 or u == 0 or sp + need <= tpm) then break end
    at, u, sp = s, u - reqs[s], sp - toks[s]
  end
  return math.max(1, math.ceil(at + window - now))
end
if rpm >= 0 and used >= rpm then return {{1, freed_at()}} end
if tpm >= 0 and need > 0 and used > 0 and spent + need > tpm then return {{2, freed_at()}} end
local r, t, room = want_r, want_t, 0
if rpm >= 0 then r = math.max(1, math.min(want_r, math.floor((rpm - used) / slice))) end
if tpm >= 0 then
  room = tpm - spent
  t = math.max(need, math.min(want_t, math.floor(room / slice)))
end
local sec = string.format('%d', second)
redis.call('HINCRBY', KEYS[1], 'r' .. sec, string.format('%d', r))
redis.call('HINCRBY', KEYS[1], 't' .. sec, string.format('%d', t))
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {{0, second, math.floor(now * 1000000), r, t, room}}
"""

# ARGV: second, requests delta, tokens delta, ... (a bucket already gone is left alone)
_CORRECT = """
for i = 1, #ARGV, 3 do
  local sec = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], 'r' .. sec) == 1 then
    redis.call('HINCRBY', KEYS[1], 'r' .. sec, ARGV[i + 1])
    redis.call('HINCRBY', KEYS[1], 't' .. sec, ARGV[i + 2])
  end
end
return 0
"""

_REASONS = {1: "requests", 2: "tokens"}


class RedisBudget:
    """`RateBudget` in Redis: a hash per user under `prefix`. `redis` must not retry a command (see
    `RedisRateLimiter`)."""

    def __init__(self, redis: Redis, prefix: str, ttl_seconds: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self._ttl_ms = str(int(ttl_seconds * 1000))
        self._take = redis.register_script(_TAKE)
        self._correct = redis.register_script(_CORRECT)

    async def rate_take(
        self, user_id: str, want: Want, now: float | None, back: Correction | None
    ) -> Grant | RateLimited:
        rpm, tpm = -1 if want.rpm is None else want.rpm, -1 if want.tpm is None else want.tpm
        now_arg = "" if now is None else repr(now)
        args: list[int | str] = [rpm, tpm, want.requests, want.tokens, want.need, self._ttl_ms, now_arg]
        args += ["", 0, 0] if back is None else back
        reply = await self._take(keys=[self.prefix + user_id], args=args)
        code = int(reply[0])
        if code:
            return RateLimited(_REASONS[code], int(reply[1]))
        second, micros, requests, tokens, room = (int(v) for v in reply[1:])
        return Grant(second, micros / 1e6, requests, tokens, room)

    async def rate_correct(self, corrections: Sequence[tuple[str, int, int, int]]) -> None:
        by_user: dict[str, list[int]] = {}
        for user_id, second, requests, tokens in corrections:
            by_user.setdefault(user_id, []).extend((second, requests, tokens))
        if not by_user:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id, args in by_user.items():
                await self._correct(keys=[self.prefix + user_id], args=args, client=pipe)
            try:
                # The connection and the script first: a Redis down fails here, before any correction went.
                await pipe.load_scripts()
            except RedisError as exc:
                raise NotApplied(str(exc)) from exc
            pipe.scripts.clear()  # (loaded: `execute` need not ask again)
            await pipe.execute()

    async def rate_sweep(self, now: float | None) -> int:
        return 0  # the take drops a user's old buckets, and idle users' keys expire


class RedisRateLimiter(LeasedRateLimiter):
    """`RateLimit` in Redis. `close()` hands back the leases and closes the connections."""

    def __init__(
        self,
        url: str,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        *,
        on_store_error: StoreErrorPolicy = StoreErrorPolicy.OPEN,
        key_prefix: str = "gateway:rl:",
        ttl_seconds: int = 2 * WINDOW,
        timeout_seconds: float = 1.0,  # connect and per command: a stuck Redis delays a request this long at most
        clock: Callable[[], float] | None = None,  # None: the server's TIME (tests inject one)
    ) -> None:
        # Blocking: more users taking at once than it has connections wait for one (takes are quick)
        # instead of failing with MaxConnectionsError, as if Redis were down.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            # Never retried: when a connection breaks after Redis ran a command and before its reply,
            # redis-py's retry runs it again: a take's hand-back (`back`) or a batch of corrections
            # (the pipeline is sent again whole) applied twice, the window undercounted (users past
            # the limit in every process). So a broken connection fails that one take (the policy
            # answers, as when Redis is down) or batch: at the script check, before any correction
            # went, as NotApplied (the Settler sends it again); after, dropped. A socket Redis closed
            # while pooled (idle timeout, CLIENT KILL, a restart) needs no retry: the pool's
            # `get_connection` (`ensure_connection`: `can_read` raises on the EOF it read) reconnects
            # it before handing it out; only one closed in the instant before a command fails it.
            retry=Retry(NoBackoff(), 0),
        )
        self.redis_budget = RedisBudget(Redis.from_pool(pool), key_prefix, ttl_seconds)
        super().__init__(
            self.redis_budget, requests_per_minute, tokens_per_minute, on_store_error, clock, "rate-limit Redis"
        )

    @property
    def redis(self) -> Redis:
        return self.redis_budget.redis

    @property
    def prefix(self) -> str:
        return self.redis_budget.prefix

    async def close(self) -> None:
        await super().close()
        await self.redis.aclose()
