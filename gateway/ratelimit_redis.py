"""Rate limits in Redis: the in-memory limiter's rules, exact across processes and machines.

One Lua script per admission (EVALSHA) reads the user's hash of 1 s buckets (fields `r<second>`
requests, `t<second>` tokens), drops the buckets out of the window, decides and counts, atomically,
on the Redis server's clock (TIME), so the processes' clocks do not matter. The key expires after
`ttl_seconds` without admissions, so idle users vanish. Token corrections go in the background.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.ratelimit import WINDOW, RateLimited, StoreErrorPolicy
from gateway.ratelimit_shared import Corrections, ErrorLog, Settler, on_store_error

log = logging.getLogger("gateway.ratelimit")

# ARGV: rpm (-1: none), tpm (-1: none), tokens, ttl ms, now ("" : the server's TIME)
# Returns {0, second} admitted, {1, retry_after} too many requests, {2, retry_after} too many tokens.
_ACQUIRE = f"""
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local window = {WINDOW}
local second = math.floor(now)
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
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
if #secs > 0 then
  table.sort(secs)
  local requests, total = 0, 0
  for _, s in ipairs(secs) do
    requests = requests + reqs[s]
    total = total + toks[s]
  end
  local function retry(oldest)
    return math.max(1, math.ceil(oldest + window - now))
  end
  if rpm >= 0 and requests >= rpm then return {{1, retry(secs[1])}} end
  if tpm >= 0 and total + tokens > tpm then
    local need, freed, at = total + tokens - tpm, 0, secs[1]
    for _, s in ipairs(secs) do
      freed = freed + toks[s]
      at = s
      if freed >= need then break end
    end
    return {{2, retry(at)}}
  end
end
redis.call('HINCRBY', KEYS[1], 'r' .. string.format('%d', second), 1)
redis.call('HINCRBY', KEYS[1], 't' .. string.format('%d', second), tokens)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {{0, second}}
"""

# ARGV: second, delta, second, delta, ... (a bucket already gone is left alone)
_SETTLE = """
for i = 1, #ARGV, 2 do
  local field = 't' .. ARGV[i]
  if redis.call('HEXISTS', KEYS[1], field) == 1 then redis.call('HINCRBY', KEYS[1], field, ARGV[i + 1]) end
end
return 0
"""

_REASONS = {1: "requests", 2: "tokens"}


class RedisRateLimiter:
    """`RateLimit` in Redis. `close()` sends the pending corrections and closes the connections."""

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
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.prefix = key_prefix
        self._ttl_ms = str(int(ttl_seconds * 1000))
        self._policy = on_store_error
        self._clock = clock
        self.redis = Redis.from_url(
            url,
            socket_connect_timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            # Once, at once, on a broken connection (a pooled socket Redis closed), never on a timeout and
            # without backoff: a request waits at most about one timeout before the policy decides.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._settle = self.redis.register_script(_SETTLE)
        self._limits = (str(-1 if self.rpm is None else self.rpm), str(-1 if self.tpm is None else self.tpm))
        self._errors = ErrorLog("rate-limit Redis")
        self._settler = Settler(self._send, self._errors)

    async def acquire(self, user_id: str, tokens: int) -> tuple[RateLimited | None, object | None]:
        if self.rpm is None and self.tpm is None:
            return None, None
        now = "" if self._clock is None else repr(self._clock())
        try:
            code, value = await self._acquire(
                keys=[self.prefix + user_id], args=[*self._limits, tokens, self._ttl_ms, now]
            )
        except Exception as exc:  # never fail the request: the policy decides
            self._errors.failed(exc)
            return on_store_error(self._policy)
        if self._errors.failing:
            self._errors.recovered()
        if code:
            return RateLimited(_REASONS[int(code)], int(value)), None
        return None, (int(value), tokens)

    def settle(self, user_id: str, ticket: object | None, actual_tokens: int) -> None:
        if isinstance(ticket, tuple):
            second, reserved = ticket
            self._settler.add(user_id, second, actual_tokens - reserved)

    async def _send(self, batch: Corrections) -> None:
        by_user: dict[str, list[int]] = {}
        for (user_id, second), delta in batch.items():
            by_user.setdefault(user_id, []).extend((second, delta))
        if not by_user:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for user_id, args in by_user.items():
                await self._settle(keys=[self.prefix + user_id], args=args, client=pipe)
            await pipe.execute()

    async def flush(self) -> None:
        """Wait until the corrections settled so far reached Redis."""
        await self._settler.flush()

    async def close(self) -> None:
        await self._settler.flush()
        await self.redis.aclose()
