"""The v3 trades/quotes API over the synthetic market: what a request means and what it is answered.

``GET /v3/{trades|quotes}/{ticker}`` as the real API behaves, since that is what the client is
written against:

- bounds: ``timestamp`` and ``timestamp.{gte,gt,lte,lt}`` as integer nanoseconds, RFC3339 or an
  ET date; ``order`` asc or desc (default desc), ``limit`` 1..50,000 (default 1,000), ``sort``;
- paging: an opaque ``next_url`` cursor that carries the query but never the API key, and that
  overrides every other parameter; an empty window answers without a ``results`` key;
- auth: a key from ``Authorization: Bearer`` or ``apiKey``; 401 without or with an unknown key,
  403 ``NOT_AUTHORIZED`` when the key's plan does not include the endpoint;
- rate limiting: 429 (with ``Retry-After`` unless turned off) for a request that would put more
  than ``rate_limit_rps`` arrivals in one second (below 1 rps: one per ``1 / rps`` seconds).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import math
import re
import sys
import time
import traceback
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import orjson

from smallcaps_ingest.simulator.config import SimConfig
from smallcaps_ingest.simulator.market import (
    CACHE,
    DATA_END_NS,
    DATA_START_NS,
    KINDS,
    MINUTE_NS,
    NO_DUPS,
    NS,
    Dups,
    Minute,
    day_bounds,
    iter_minutes,
    liquidity,
    minute_slice,
    tape_dups,
)

MAX_LIMIT = 50_000
DEFAULT_LIMIT = 1000

#: Which endpoints each plan may read (a plan not listed reads none).
_PLANS = {
    "advanced": frozenset(KINDS),
    "business": frozenset(KINDS),
    "enterprise": frozenset(KINDS),
    "developer": frozenset({"trades"}),
}

_ERR_NO_KEY = "API Key was not provided"
_ERR_BAD_KEY = "Unknown API Key"
_MSG_NOT_ENTITLED = (
    "You are not entitled to this data. Please upgrade your plan at https://massive.com/pricing"
)
_ERR_429 = (
    "You've exceeded the maximum requests per minute, please wait or upgrade your subscription to "
    "continue. https://massive.com/pricing"
)
ERR_5XX = "Internal server error"


def error_body(
    rid: str, status: str = "ERROR", *, error: str | None = None, message: str | None = None
) -> bytes:
    """The API's JSON error shape: ``status``, ``request_id`` and an ``error`` or a ``message``."""
    d: dict[str, str] = {"status": status, "request_id": rid}
    if error is not None:
        d["error"] = error
    if message is not None:
        d["message"] = message
    return orjson.dumps(d)


# --------------------------------------------------------------------------------------------------
# Query parsing
# --------------------------------------------------------------------------------------------------


class BadRequest(Exception):
    """A parameter the API would refuse with 400; the message names it and quotes its value."""


_RE_INT = re.compile(r"\d{1,19}\Z")
_RE_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})\Z")
_RE_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?\Z"
)


def _parse_ts(name: str, value: str) -> tuple[int, int | None]:
    """Parse ns / RFC3339 / YYYY-MM-DD -> (instant, None) or (ET day start, next ET day start)."""
    v = value.strip()
    try:
        if _RE_INT.match(v):
            return int(v), None
        m = _RE_DATE.match(v)
        if m:
            return day_bounds(int(m[1]), int(m[2]), int(m[3]))
        m = _RE_RFC3339.match(v)
        if m:
            y, mo, d, hh, mi = (int(m[i]) for i in range(1, 6))
            ss = int(m[6] or 0)
            datetime(y, mo, d, hh, mi, ss)  # validates ranges
            secs = calendar.timegm((y, mo, d, hh, mi, ss, 0, 0, 0))
            if m[9]:  # numeric offset; no offset at all is read as UTC
                off = int(m[10]) * 3600 + int(m[11]) * 60
                secs -= off if m[9] == "+" else -off
            frac = int((m[7] or "").ljust(9, "0"))
            return secs * NS + frac, None
    except (ValueError, OverflowError):
        pass
    raise BadRequest(
        f"Could not parse the '{name}' parameter value {value!r}: expected nanoseconds since the epoch, "
        "an RFC3339 timestamp or a YYYY-MM-DD date"
    )


@dataclass(frozen=True)
class Query:
    kind: str
    ticker: str
    gte: int | None
    lt: int | None
    desc: bool
    limit: int
    pos: tuple[int, int] | None  # (sip_timestamp, sequence_number) of the last row already served
    cursor: bool


def _parse_params(kind: str, ticker: str, q: dict[str, str]) -> Query:
    gte: int | None = None
    lt: int | None = None

    def lower(x: int) -> None:
        nonlocal gte
        gte = x if gte is None else max(gte, x)

    def upper(x: int) -> None:
        nonlocal lt
        lt = x if lt is None else min(lt, x)

    if "timestamp" in q:
        p, end = _parse_ts("timestamp", q["timestamp"])
        lower(p)
        upper(p + 1 if end is None else end)
    if "timestamp.gte" in q:
        lower(_parse_ts("timestamp.gte", q["timestamp.gte"])[0])
    if "timestamp.gt" in q:
        lower(_parse_ts("timestamp.gt", q["timestamp.gt"])[0] + 1)
    if "timestamp.lte" in q:
        p, end = _parse_ts("timestamp.lte", q["timestamp.lte"])
        upper(p + 1 if end is None else end)
    if "timestamp.lt" in q:
        upper(_parse_ts("timestamp.lt", q["timestamp.lt"])[0])
    order = q.get("order", "desc")
    if order.lower() not in ("asc", "desc"):
        raise BadRequest(f"Invalid value for 'order': {order!r} (must be 'asc' or 'desc')")
    sort = q.get("sort", "timestamp")
    if sort != "timestamp":
        raise BadRequest(f"Invalid value for 'sort': {sort!r} (only 'timestamp' is supported)")
    raw_limit = q.get("limit", str(DEFAULT_LIMIT))
    if not _RE_INT.match(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise BadRequest(
            f"Invalid value for 'limit': {raw_limit!r} (must be an integer from 1 to {MAX_LIMIT})"
        )
    return Query(kind, ticker, gte, lt, order.lower() == "desc", int(raw_limit), None, False)


def _encode_cursor(qy: Query, pos: tuple[int, int]) -> str:
    """Opaque base64url cursor carrying kind, ticker, bounds, order, limit and position (never a key)."""
    text = urlencode(
        [
            ("k", qy.kind),
            ("t", qy.ticker),
            ("gte", "" if qy.gte is None else qy.gte),
            ("lt", "" if qy.lt is None else qy.lt),
            ("order", "desc" if qy.desc else "asc"),
            ("limit", qy.limit),
            ("ps", pos[0]),
            ("pq", pos[1]),
        ]
    )
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _decode_cursor(kind: str, ticker: str, cursor: str) -> Query:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        f = dict(parse_qsl(raw, keep_blank_values=True, strict_parsing=True))
        gte = int(f["gte"]) if f["gte"] else None
        lt = int(f["lt"]) if f["lt"] else None
        limit = int(f["limit"])
        pos = (int(f["ps"]), int(f["pq"]))
        order = f["order"]
        ok = f["k"] == kind and f["t"] == ticker and order in ("asc", "desc") and 1 <= limit <= MAX_LIMIT
    except (ValueError, KeyError, UnicodeDecodeError, binascii.Error):
        ok = False
    if not ok:
        raise BadRequest(
            f"Invalid value for 'cursor': {cursor!r} (not a cursor issued for /v3/{kind}/{ticker})"
        )
    return Query(kind, ticker, gte, lt, order == "desc", limit, pos, True)


@dataclass(frozen=True)
class ApiRequest:
    """One request as the API reads it, before anything is decided about it."""

    endpoint: str  # "trades", "quotes", or "other" (answered 404)
    ticker: str | None
    params: dict[str, str] = field(repr=False)  # the query string (may hold apiKey), first values
    query: Query | None  # the parsed bounds/order/limit (or cursor), None off the endpoints or if bad
    bad: str | None  # why the parameters earn a 400
    key: str = field(repr=False)  # the API key from the Authorization header or apiKey, "" if none


def _route(path: str) -> tuple[str, str | None]:
    parts = path.split("/")
    if len(parts) == 4 and parts[0] == "" and parts[1] == "v3" and parts[2] in KINDS and parts[3]:
        return parts[2], unquote(parts[3])
    return "other", None


def _api_key(authorization: str, q: dict[str, str]) -> str:
    if authorization[:7].lower() == "bearer " and authorization[7:].strip():
        return authorization[7:].strip()
    return q.get("apiKey", "")


def parse_request(target: str, authorization: str | None, routable: bool = True) -> ApiRequest:
    """Read a request target (path and query) and its Authorization header.

    ``routable=False`` (methods other than GET) routes it nowhere, so it is answered 404. A cursor,
    when present, overrides every other parameter, as the real API's does.
    """
    q: dict[str, str] = {}
    try:
        split = urlsplit(target)
        path = split.path
        for k, v in parse_qsl(split.query, keep_blank_values=True):
            q.setdefault(k, v)
    except ValueError:  # unparseable request target: answer 404 like any unknown path
        path = ""
    endpoint, ticker = _route(path) if routable else ("other", None)
    qy: Query | None = None
    bad: str | None = None
    if ticker is not None:
        try:
            qy = (
                _decode_cursor(endpoint, ticker, q["cursor"])
                if "cursor" in q
                else _parse_params(endpoint, ticker, q)
            )
        except BadRequest as e:
            bad = str(e)
    return ApiRequest(endpoint, ticker, q, qy, bad, _api_key(authorization or "", q))


# --------------------------------------------------------------------------------------------------
# Answers: admission (429, 404, 401/403), then the page (or 400)
# --------------------------------------------------------------------------------------------------


def admit(
    req: ApiRequest, cfg: SimConfig, rid: str, limited: bool, retry_after: int
) -> tuple[int, bytes, list[str] | None]:
    """(status, body, extra headers) before any data is read: 429 when rate-limited, 404 off the
    two endpoints, 401/403 when the key may not read this one; 200 and no body when it may proceed."""
    if limited:
        extra = [f"Retry-After: {retry_after}"] if cfg.rate_limit_retry_after else None
        return 429, error_body(rid, error=_ERR_429), extra
    if req.ticker is None:
        return 404, error_body(rid, "NOT_FOUND", message="Not found"), None
    if not req.key:
        return 401, error_body(rid, error=_ERR_NO_KEY), None
    plan = "advanced" if cfg.keys is None else cfg.keys.get(req.key)
    if plan is None:
        return 401, error_body(rid, error=_ERR_BAD_KEY), None
    if req.endpoint not in _PLANS.get(plan.lower(), frozenset()):
        return 403, error_body(rid, "NOT_AUTHORIZED", message=_MSG_NOT_ENTITLED), None
    return 200, b"", None


def serve(req: ApiRequest, cfg: SimConfig, rid: str, base_url: str) -> tuple[int, bytes, int]:
    """(status, body, rows) for an admitted request: its page, or the 400 its parameters earn."""
    if req.bad is not None or req.query is None:
        return 400, error_body(rid, error=req.bad or "bad request"), 0
    try:
        body, rows = _page(req.query, rid, cfg, base_url)
    except Exception:  # a simulator bug must surface as a 500, not as a hung connection
        traceback.print_exc(file=sys.stderr)
        return 500, error_body(rid, error=ERR_5XX), 0
    return 200, body, rows


def _page(qy: Query, rid: str, cfg: SimConfig, base_url: str) -> tuple[bytes, int]:
    """Assemble a 200 body by joining cached row bytes; returns (body, rows)."""
    size = qy.limit if cfg.page_cap is None else max(1, min(qy.limit, cfg.page_cap))
    segs, more = collect(qy, size, time.time_ns(), tape_dups(cfg), cfg.page_ends_at_day)
    if not segs:
        return b'{"status":"OK","request_id":"' + rid.encode() + b'"}', 0
    parts: list[bytes] = []
    total = 0
    for md, a, b in segs:
        chunk = md.rows[a:b]
        if qy.desc:
            chunk.reverse()
        parts.extend(chunk)
        total += b - a
    out = [b'{"results":[', b",".join(parts), b'],"status":"OK","request_id":"', rid.encode(), b'"']
    if more:
        pos = row_at(segs, qy.desc, total - 1)
        path = f"/v3/{qy.kind}/{quote(qy.ticker, safe='.')}"
        url = f"{base_url}{path}?cursor={_encode_cursor(qy, pos)}"
        out += [b',"next_url":"', url.encode(), b'"']
    out.append(b"}")
    return b"".join(out), total


def collect(
    qy: Query, page_size: int, now_ns: int, dups: Dups = NO_DUPS, day_pages: bool = False
) -> tuple[list[tuple[Minute, int, int]], bool]:
    """Segments (minute, a, b) forming the page in serve order, and whether more rows remain after it.

    ``day_pages``: the page ends after the last row of the first ET day it holds (with a cursor
    when more rows follow), so it may hold fewer than ``page_size`` rows.
    """
    segs: list[tuple[Minute, int, int]] = []
    if liquidity(qy.ticker) <= 0:
        return segs, False
    gte = DATA_START_NS if qy.gte is None else max(qy.gte, DATA_START_NS)
    lt = min(now_ns if qy.lt is None else qy.lt, DATA_END_NS)
    pm = -1
    ps = pq = 0
    lo, hi = gte, lt
    if qy.pos is not None:
        ps, pq = qy.pos
        pm = ps - ps % MINUTE_NS
        if qy.desc:
            hi = min(hi, ps + 1)
        else:
            lo = max(lo, ps)
    need = page_size
    first_day = None
    for m, k, d in iter_minutes(lo, hi, qy.desc):
        md = CACHE.get(qy.kind, qy.ticker, m, k, d, dups)
        if not md.sips:
            continue
        a, b = minute_slice(md, m, gte, lt)
        if m == pm:
            if qy.desc:
                b = min(b, pq - md.seq_base - 1)
            else:
                a = max(a, pq - md.seq_base)
        if a >= b:
            continue
        if need == 0 or (day_pages and first_day is not None and d != first_day):
            return segs, True
        first_day = d
        take = min(b - a, need)
        segs.append((md, a, a + take) if not qy.desc else (md, b - take, b))
        need -= take
        if take < b - a:
            return segs, True
    return segs, False


def row_at(segs: list[tuple[Minute, int, int]], desc: bool, idx: int) -> tuple[int, int]:
    """The cursor position of the idx-th served row of a page: its sip_timestamp and
    ``seq_base`` + its 1-based place in its minute (a position, not the row's sequence_number,
    which may repeat)."""
    for md, a, b in segs:
        n = b - a
        if idx < n:
            i = b - 1 - idx if desc else a + idx
            return md.sips[i], md.seq_base + i + 1
        idx -= n
    raise IndexError(idx)


# --------------------------------------------------------------------------------------------------
# Rate limiting
# --------------------------------------------------------------------------------------------------


class RateLimiter:
    """Admits a request only if no window of the limit's length that contains its arrival would
    then hold more admitted arrivals than the limit allows.

    Arrivals are when a request's bytes reached the server (see ``server.py``); handlers may reach
    the limiter out of that order, so it keeps admitted arrivals sorted. Not thread-safe: the
    server calls it under its lock.
    """

    def __init__(self) -> None:
        self._admitted: list[float] = []  # sorted arrival times (monotonic clock) of admitted requests

    def admit(self, rps: float | None, now: float, handled: float) -> tuple[bool, int]:
        """(limited, Retry-After seconds) for a request that arrived at ``now`` and is decided at
        ``handled``. Without a limit it still records the arrival, so that turning the limiter on
        mid-run counts the requests already inside the window."""
        dq = self._admitted
        if rps is None:
            insort(dq, now)
            if len(dq) > 100_000:
                del dq[:50_000]
            return False, 1
        allowed = max(1, int(rps)) if rps >= 1 else 1
        window = 1.0 if rps >= 1 else 1.0 / max(rps, 1e-9)
        old = bisect_left(dq, handled - 2.0 * window - 1.0)
        if old:
            del dq[:old]
        lo, mid, hi = bisect_right(dq, now - window), bisect_right(dq, now), bisect_left(dq, now + window)
        if _fullest_window(dq, lo, mid, hi, window) >= allowed:
            return True, (max(1, math.ceil(dq[lo] + window - now)) if lo < hi else 1)
        insort(dq, now)
        return False, 1


def _fullest_window(times: list[float], lo: int, mid: int, hi: int, window: float) -> int:
    """Most of ``times`` in any window [x, x + window) that also holds t, t not counted.

    ``times[lo:mid]`` lie in (t - window, t] and ``times[mid:hi]`` in (t, t + window); the fullest
    such window starts at t or at one of the earlier arrivals.
    """
    best = hi - mid  # the window starting at t itself
    j = mid
    for i in range(lo, mid):
        while j < hi and times[j] < times[i] + window:
            j += 1
        best = max(best, j - i)
    return best
