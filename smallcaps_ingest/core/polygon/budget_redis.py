"""The request budget on Redis: one sliding window shared by every host of a team.

The same budget as :class:`smallcaps_ingest.core.polygon.budget.RequestBudget` (grants count from grant until
one window after their request bytes were sent, AIMD on 429, a 429's ``Retry-After`` holds every
grant), kept in three Redis keys per bucket and changed only by Lua scripts, which Redis runs
atomically. Every time is Redis's own clock (``TIME`` inside the script), so hosts whose clocks
disagree still share one window.

Failure is closed: while Redis cannot be reached no grant is given (``try_acquire`` returns a
wait, so no request is sent), the client reconnects by itself, and after ``unavailable_timeout``
seconds without Redis the budget raises :class:`BudgetUnavailable`, which fails the run. A Redis
that comes back empty (restarted without persistence, flushed) may have forgotten grants that
are still in flight or in the window, so an empty state first holds every grant for one
``PENDING_LEASE`` plus one window (``cold_start``).

``limits`` (moving window) and ``pyrate-limiter`` (``RedisBucket``) were measured against this
script on two processes (benchmarks/README.md, decision record D12): neither counts a grant
until its request is sent, and neither shares an AIMD rate or a Retry-After.
"""

from __future__ import annotations

import contextlib
import os
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from smallcaps_ingest.core.polygon.budget import (
    DECREASE_EVERY,
    DECREASE_FACTOR,
    INCREASE_PER_SECOND,
    MAX_RETRY_AFTER,
    MIN_RATE,
    PENDING_LEASE,
    WINDOW_MARGIN,
    BudgetBase,
    BudgetUnavailable,
)

DEFAULT_PREFIX = "smallcaps:"
# Redis errors that mean "not reachable now" (refused, reset, timeout, still loading its data).
_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# Shared by the scripts: now (server clock), the current AIMD rate, number formatting.
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function f(x) return string.format('%.6f', x) end
local function rate_of(s, max_rps, inc)
  if not s[1] then return max_rps end
  return math.min(max_rps, tonumber(s[1]) + inc * max_rps * math.max(0, now - tonumber(s[2])))
end
"""

# KEYS: grants (zset: grant id -> time it counts from), state (hash: rate, updated,
# last_decrease, pause_until, epoch). ARGV: max_rps, margin, lease, increase, cold_start, grant id.
# Returns {1, '0'} for a grant, else {0, seconds to wait}.
_ACQUIRE = _COMMON + """
local max_rps, margin, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[2], 'rate', 'updated', 'pause_until', 'epoch')
if not s[4] then
  local cold = tonumber(ARGV[5])
  redis.call('HSET', KEYS[2], 'epoch', f(now), 'pause_until', f(now + cold))
  if cold > 0 then return {0, f(cold)} end
end
local pause = tonumber(s[3] or '0')
if pause > now then return {0, f(pause - now)} end
local rate = rate_of(s, max_rps, tonumber(ARGV[4]))
local allowed, window
if rate >= 1 then
  allowed, window = math.floor(rate), 1 + margin
else
  allowed, window = 1, (1 / rate) * (1 + margin)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', f(now - 60))
local got = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. f(now - window),
                       'WITHSCORES', 'LIMIT', 0, allowed)
if #got / 2 < allowed then
  redis.call('ZADD', KEYS[1], f(now + lease), ARGV[6])
  return {1, '0'}
end
local oldest = tonumber(got[#got])
if oldest > now then return {0, '0.002'} end
return {0, f(math.max(0.0005, oldest + window - now))}
"""

# KEYS: grants. ARGV: grant id. The grant counts from now (its request bytes were just sent).
_SENT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000), ARGV[1])
return 1
"""

# KEYS: state. ARGV: max_rps, increase, decrease factor, decrease every, min rate, retry_after.
_THROTTLED = _COMMON + """
local max_rps = tonumber(ARGV[1])
local s = redis.call('HMGET', KEYS[1], 'rate', 'updated', 'last_decrease', 'pause_until')
local rate = rate_of(s, max_rps, tonumber(ARGV[2]))
local retry_after = tonumber(ARGV[6])
if retry_after > 0 and now + retry_after > tonumber(s[4] or '0') then
  redis.call('HSET', KEYS[1], 'pause_until', f(now + retry_after))
end
if s[3] and now - tonumber(s[3]) < tonumber(ARGV[4]) then return f(rate) end
rate = math.max(tonumber(ARGV[5]), rate * tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'rate', f(rate), 'updated', f(now), 'last_decrease', f(now))
return f(rate)
"""

# KEYS: state. ARGV: max_rps, increase.
_RATE = _COMMON + """
return f(rate_of(redis.call('HMGET', KEYS[1], 'rate', 'updated'), tonumber(ARGV[1]), tonumber(ARGV[2])))
"""


def split_url(url: str) -> tuple[str, str]:
    """(the URL redis-py connects to, the key prefix from its ``key_prefix=`` query parameter)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "key_prefix"), DEFAULT_PREFIX)
    rest = urlencode([(k, v) for k, v in query if k != "key_prefix"])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), prefix


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisBudget(BudgetBase):
    """The Redis backend (many hosts): ``acquire()`` returns once a request may be sent.

    ``unavailable_timeout``: seconds Redis may stay unreachable before :class:`BudgetUnavailable`.
    ``cold_start``: seconds an empty (new or lost) state holds every grant; default
    ``PENDING_LEASE`` + one window, the longest a forgotten grant can still count.
    """

    def __init__(
        self,
        max_rps: float,
        url: str,
        bucket: str = "polygon",
        unavailable_timeout: float = 120.0,
        cold_start: float | None = None,
    ):
        if not max_rps or max_rps <= 0:
            raise ValueError(f"POLYGON_MAX_RPS must be > 0, got {max_rps!r}")
        self.max_rps = float(max_rps)
        self.url = redacted(url)
        connect_url, prefix = split_url(url)
        self.bucket = bucket
        tag = f"{prefix}{{{bucket}}}"  # one hash tag: both keys live on one cluster slot
        self.keys = (f"{tag}:grants", f"{tag}:state")
        self.unavailable_timeout = float(unavailable_timeout)
        self.cold_start = PENDING_LEASE + 1.0 + WINDOW_MARGIN if cold_start is None else float(cold_start)
        self.redis = redis.Redis.from_url(
            connect_url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=5
        )
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._sent = self.redis.register_script(_SENT)
        self._throttled = self.redis.register_script(_THROTTLED)
        self._rate = self.redis.register_script(_RATE)
        self._down_since: float | None = None  # monotonic time of the first failure in a row
        self.outages = 0  # how many times Redis went away (for tests and logs)

    def _call(self, script, keys, args):  # type: ignore[no-untyped-def]
        """Run a script; on a Redis outage raise BudgetUnavailable once it lasted too long."""
        try:
            out = script(keys=keys, args=args)
        except _DOWN as e:
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                self.outages += 1
            if now - self._down_since > self.unavailable_timeout:
                raise BudgetUnavailable(
                    f"the request budget at {self.url} has been unreachable for "
                    f"{now - self._down_since:.0f} s (POLYGON_BUDGET_TIMEOUT={self.unavailable_timeout:g}); "
                    f"no request was sent without a grant: {type(e).__name__}: {e}"
                ) from None
            raise
        self._down_since = None
        return out

    def try_acquire(self) -> float:
        """Take a grant now and return 0.0, or return how long to wait before trying again."""
        grant = os.urandom(8).hex()
        try:
            ok, wait = self._call(
                self._acquire,
                self.keys,
                [self.max_rps, WINDOW_MARGIN, PENDING_LEASE, INCREASE_PER_SECOND, self.cold_start, grant],
            )
        except _DOWN:
            return 0.25  # closed: no grant while Redis is away; try again (redis-py reconnects)
        if int(ok):
            self._pending(grant)
            return 0.0
        return max(0.0005, float(wait))

    def _stamp(self, grant: object) -> None:
        # On an outage the grant stays counted as in flight (PENDING_LEASE): that errs on the safe side.
        with contextlib.suppress(*_DOWN):
            self._call(self._sent, self.keys[:1], [grant])

    def on_throttled(self, retry_after: float | None = None) -> float:
        """A 429 arrived: cut the shared rate (once per DECREASE_EVERY for every host); with its
        ``Retry-After`` (seconds), no host gets a grant before then."""
        ra = min(retry_after, MAX_RETRY_AFTER) if retry_after and retry_after > 0 else 0.0
        args = [self.max_rps, INCREASE_PER_SECOND, DECREASE_FACTOR, DECREASE_EVERY, MIN_RATE, ra]
        try:
            return float(self._call(self._throttled, self.keys[1:], args))
        except _DOWN:
            return self.max_rps  # the cut is lost with Redis; grants wait for it to come back anyway

    @property
    def effective_rps(self) -> float:
        return float(self._call(self._rate, self.keys[1:], [self.max_rps, INCREASE_PER_SECOND]))

    def delete_keys(self) -> None:
        """Forget this bucket's grants and rate (tests, and resetting a team's budget)."""
        self.redis.delete(*self.keys)

    def close(self) -> None:
        self.redis.close()
