"""A Polygon/Massive v3-compatible trades and NBBO quotes server, bundled as the test peer and demo source.

Why it exists: the platform must be testable, demoable and benchmarkable without a paid API key and
without the network. The server speaks the real ``/v3/trades/{ticker}`` and ``/v3/quotes/{ticker}``
wire format (field names and types copied from the upstream client's fixtures), real pagination
(opaque ``next_url`` cursors, empty windows omit ``results``), real auth and entitlement errors, and
it can inject the faults a production client must survive: latency, 429 rate limiting, 5xx,
connection resets, truncated bodies, and what proxies in front of an API produce: HTML 502/504
pages, requests never answered and bodies that stall mid-way.

Tick data is a pure function of (kind, ticker, UTC minute): every minute is generated from its own
seeded RNG, so any query, any page size, any server instance and :func:`ground_truth` agree byte
for byte. Generated minutes are cached as pre-serialized row bytes so a response is a ``join``.

Pure stdlib + orjson on purpose: ``python -m smallcaps_ingest.simulator`` must start fast and must not
import Dagster.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import calendar
import contextlib
import io
import ipaddress
import math
import os
import random
import re
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from hashlib import blake2b
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit
from zoneinfo import ZoneInfo

import orjson

from smallcaps_ingest.core.trading_calendar import is_trading_day

__all__ = [
    "LIQUIDITY",
    "RequestRecord",
    "SimConfig",
    "Simulator",
    "clear_cache",
    "ground_truth",
    "liquidity",
    "main",
]

ET = ZoneInfo("America/New_York")
NS = 1_000_000_000
MINUTE_NS = 60 * NS
#: No data before this instant (2000-01-01 00:00 ET); bounds unbounded queries so they terminate.
DATA_START_NS = 946_702_800 * NS
#: ... and none from 2200-01-01 on, so absurd far-future bounds cannot walk off the calendar.
DATA_END_NS = 7_258_118_400 * NS
MAX_LIMIT = 50_000
DEFAULT_LIMIT = 1000
MAX_TICKS_PER_MINUTE = 99_999
SEQ_STRIDE = 100_000
KINDS = ("trades", "quotes")
BASE_RATE = {"trades": 2.0, "quotes": 10.0}

#: Explicit liquidity multipliers for names the tests and demo rely on; others hash to [0.05, 3.0].
LIQUIDITY: dict[str, float] = {"AAOI": 1.0, "BRK.B": 4.0, "XELB": 0.02, "DEAD": 0.0, "ZZZZ": 0.0, "HVY": 12.0}

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
_ERR_5XX = "Internal server error"
#: What nginx (in front of an API, or as a CDN's origin proxy) answers when its upstream fails.
_PROXY_PAGE = (
    "<html>\r\n<head><title>{code} {phrase}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


# --------------------------------------------------------------------------------------------------
# Session calendar
# --------------------------------------------------------------------------------------------------


def _session_factors() -> tuple[float, ...]:
    """Intensity factor per minute-of-ET-day: PM 0.15, RTH 1.0 with a 2x U-shape, AH 0.1, else 0."""
    out = []
    for k in range(1440):
        if 240 <= k < 570:
            f = 0.15
        elif 570 <= k < 600 or 930 <= k < 960:
            f = 2.0
        elif 600 <= k < 930:
            f = 1.0
        elif 960 <= k < 1200:
            f = 0.1
        else:
            f = 0.0
        out.append(f)
    return tuple(out)


_FACTOR = _session_factors()
_FIRST_ACTIVE_MIN = 240  # 04:00 ET
_END_ACTIVE_MIN = 1200  # 20:00 ET


_DAY_CACHE: dict[int, tuple[int, bool]] = {}


def _day(ordinal: int) -> tuple[int, bool]:
    """(ET midnight in UTC ns, whether the day holds a session) for a proleptic ordinal; no session on
    weekends and NYSE holidays (``trading_calendar``). Memoised because it is hot."""
    hit = _DAY_CACHE.get(ordinal)
    if hit is None:
        d = date.fromordinal(ordinal)
        midnight = int(datetime(d.year, d.month, d.day, tzinfo=ET).timestamp()) * NS
        hit = (midnight, is_trading_day(d))
        if len(_DAY_CACHE) < 200_000:
            _DAY_CACHE[ordinal] = hit
    return hit


def _et_ordinal(ns: int) -> int:
    """ET calendar day (ordinal) containing the instant ``ns``."""
    return datetime.fromtimestamp(ns // NS, tz=ET).toordinal()


def _iter_minutes(lo: int, hi: int, desc: bool) -> Iterator[tuple[int, int, int]]:
    """Yield (minute_start_ns, minute_of_ET_day, ET day ordinal) for session minutes overlapping [lo, hi).

    Walks day by day and skips closed days (weekends, NYSE holidays) and overnight hours
    arithmetically, so a multi-day or unbounded query never generates (or even visits) minutes that
    cannot hold ticks. Active days are weekdays, never the 23- or 25-hour DST change Sundays, so a
    minute's offset from ET midnight is its ET clock time.
    """
    if lo >= hi:
        return
    lo_floor = lo - lo % MINUTE_NS
    if not desc:
        d = _et_ordinal(lo)
        while True:
            midnight, is_open = _day(d)
            if midnight >= hi:
                return
            if is_open:
                first = max(midnight + _FIRST_ACTIVE_MIN * MINUTE_NS, lo_floor)
                stop = min(midnight + _END_ACTIVE_MIN * MINUTE_NS, hi)
                for m in range(first, stop, MINUTE_NS):
                    yield m, (m - midnight) // MINUTE_NS, d
            d += 1
    else:
        d = _et_ordinal(hi - 1)
        while True:
            midnight, is_open = _day(d)
            if is_open:
                top = min(midnight + _END_ACTIVE_MIN * MINUTE_NS, hi) - 1
                top -= top % MINUTE_NS
                bottom = max(midnight + _FIRST_ACTIVE_MIN * MINUTE_NS, lo_floor)
                for m in range(top, bottom - 1, -MINUTE_NS):
                    yield m, (m - midnight) // MINUTE_NS, d
            if midnight <= lo:
                return
            d -= 1


# --------------------------------------------------------------------------------------------------
# Per-ticker constants and minute generation
# --------------------------------------------------------------------------------------------------


def _hash_unit(text: str, salt: str) -> float:
    """Deterministic uniform [0, 1) from a ticker; blake2b so it is stable across processes."""
    h = blake2b(f"{salt}|{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def liquidity(ticker: str) -> float:
    """Intensity multiplier of a ticker: table value, else log-uniform in [0.05, 3.0] from a hash."""
    if ticker in LIQUIDITY:
        return LIQUIDITY[ticker]
    u = _hash_unit(ticker, "liquidity")
    return math.exp(math.log(0.05) + u * (math.log(3.0) - math.log(0.05)))


@dataclass(frozen=True)
class _TickerParams:
    liq: float
    base_price: float
    div: int  # 100 -> 2 decimals, 10_000 -> 4 decimals (sub-dollar names)
    tape: int
    spread_max: int
    phase: float


_TICKER_CACHE: dict[str, _TickerParams] = {}


def _ticker_params(ticker: str) -> _TickerParams:
    tp = _TICKER_CACHE.get(ticker)
    if tp is None:
        u = _hash_unit(ticker, "price")
        base = math.exp(math.log(0.5) + u * (math.log(60.0) - math.log(0.5)))
        div = 10_000 if base < 1.0 else 100
        tape = 1 + int(_hash_unit(ticker, "tape") * 3)
        spread_max = 1 + int(_hash_unit(ticker, "spread") * 6)
        if div == 10_000:
            spread_max *= 25  # sub-dollar names quote in 0.0001 but spreads are ~cents wide
        tp = _TickerParams(liquidity(ticker), base, div, tape, spread_max, _hash_unit(ticker, "phase"))
        if len(_TICKER_CACHE) < 100_000:
            _TICKER_CACHE[ticker] = tp
    return tp


def _center_ticks(tp: _TickerParams, minute_of_day: int, day_ord: int) -> int:
    """Smooth deterministic price level (in ticks) so consecutive minutes and trades/quotes agree."""
    x = 0.03 * math.sin(2 * math.pi * (minute_of_day / 390.0 + tp.phase))
    x += 0.15 * math.sin(day_ord / 9.0 + 2 * math.pi * tp.phase)
    return max(2, round(tp.base_price * math.exp(x) * tp.div))


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam < 30:
        limit = math.exp(-lam)
        k = 0
        p = rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        return k
    return max(0, min(MAX_TICKS_PER_MINUTE, round(rng.gauss(lam, math.sqrt(lam)))))


_TRADE_EXCH = (4, 4, 4, 4, 4, 4, 4, 4, 8, 10, 11, 11, 12, 12, 12, 15, 15, 19, 19, 21)
_TRF_IDS = (201, 202, 203)
_LOTS = (1, 1, 1, 1, 2, 2, 3, 5, 10)
_COND_RTH = ([14, 41], [41], [14], [14, 41], [10, 41])
_QUOTE_EXCH = (1, 2, 3, 7, 8, 9, 10, 11, 11, 12, 12, 15, 15, 17, 19, 19, 20, 21)


class _Minute:
    """One generated minute: sorted sip timestamps, pre-serialized rows (same order), sequence base."""

    __slots__ = ("sips", "rows", "seq_base", "nbytes")

    def __init__(self, sips: list[int], rows: list[bytes], seq_base: int) -> None:
        self.sips = sips
        self.rows = rows
        self.seq_base = seq_base
        self.nbytes = sum(map(len, rows)) + 120 * len(rows) + 200


def _minute_seed(kind: str, ticker: str, minute_ns: int) -> int:
    return int.from_bytes(blake2b(f"{kind}|{ticker}|{minute_ns}".encode()).digest()[:8], "big")


#: (duplicate_sequence_rate, identical_trade_rate) of a SimConfig; (0, 0) is the plain tape.
Dups = tuple[float, float]
NO_DUPS: Dups = (0.0, 0.0)


def _dups(cfg: SimConfig | None) -> Dups:
    return NO_DUPS if cfg is None else (cfg.duplicate_sequence_rate, cfg.identical_trade_rate)


def _generate(
    kind: str, ticker: str, minute_ns: int, minute_of_day: int, day_ord: int, dups: Dups = NO_DUPS
) -> _Minute:
    """Generate a minute's rows; depends only on its arguments (which derive from kind/ticker/minute).

    Sequence numbers are ``minute_of_day * SEQ_STRIDE + 1, + 2, ...``: they restart every ET day,
    as the real API's do ("values reset after each trading session/day"), so two days of one
    ticker share numbers. ``dups`` (trades only) adds the tape's genuine duplicates: see
    ``_gen_trades``.
    """
    seq_base = minute_of_day * SEQ_STRIDE
    tp = _ticker_params(ticker)
    rate = BASE_RATE[kind] * tp.liq * _FACTOR[minute_of_day]
    if rate <= 0:
        return _Minute([], [], seq_base)
    rng = random.Random(_minute_seed(kind, ticker, minute_ns))
    n = _poisson(rng, rate * 60.0)
    if n == 0:
        return _Minute([], [], seq_base)
    r = rng.random
    sips = sorted([minute_ns + int(r() * 59_999_999_999) for _ in range(n)])
    center = _center_ticks(tp, minute_of_day, day_ord)
    if kind == "trades":
        dup_rng = random.Random(_minute_seed("dups", ticker, minute_ns)).random if any(dups) else None
        rows, sips = _gen_trades(
            r, sips, seq_base, tp, center, minute_of_day < 570 or minute_of_day >= 960, dups, dup_rng
        )
    else:
        rows = _gen_quotes(r, sips, seq_base, tp, center)
    return _Minute(sips, rows, seq_base)


def _compact_dumps(obj: Any) -> bytes:
    """orjson's bytes keep their over-allocated buffer (~4 KiB per row); cached rows are copied
    to exact size, which cuts the cache's memory ~30x (measured: 824 MB -> 28 MB for 200k rows)."""
    return bytes(memoryview(orjson.dumps(obj)))


def _gen_trades(
    r: Any,
    sips: list[int],
    seq_base: int,
    tp: _TickerParams,
    price_t: int,
    extended: bool,
    dups: Dups = NO_DUPS,
    dup_rng: Any = None,
) -> tuple[list[bytes], list[int]]:
    """The minute's trade rows and their sip timestamps (one per row).

    With ``dup_rng`` (its own seeded stream, so the plain tape is the same with or without it), a
    ``dups[0]`` share of trades reuse the previous trade's ``sequence_number`` (a different trade:
    own id, price, size, time), and a ``dups[1]`` share are served twice, identical in every field:
    both seen on the real tape (polygon-io/issues#241, #233). The cursor never relies on sequence
    numbers being unique: it counts positions (``_row_at``).
    """
    dumps = _compact_dumps
    div = tp.div
    tape = tp.tape
    n_exch = len(_TRADE_EXCH)
    n_lots = len(_LOTS)
    n_cond = len(_COND_RTH)
    rows: list[bytes] = []
    append = rows.append
    out_sips = sips if dup_rng is None else []
    seq = seq_base
    number = 0  # the previous trade's sequence_number (0: none yet in this minute)
    for sip in sips:
        seq += 1
        reuse, twice = (dup_rng() < dups[0], dup_rng() < dups[1]) if dup_rng is not None else (False, False)
        number = number if reuse and number else seq
        u = r()
        if u < 0.2:
            price_t += 1
        elif u < 0.4 and price_t > 1:
            price_t -= 1
        pts = sip - 50_000 - int(r() * 2_950_001)
        if r() < 0.72:
            size = 100 * _LOTS[int(r() * n_lots)]
            odd = False
        else:
            size = 1 + int(r() * 99)
            odd = True
        exch = _TRADE_EXCH[int(r() * n_exch)]
        row: dict[str, Any] = {}
        if r() >= 0.4:
            if odd:
                row["conditions"] = [12, 37] if extended else [37]
            elif extended:
                row["conditions"] = [12]
            else:
                row["conditions"] = _COND_RTH[int(r() * n_cond)]
        if r() < 0.001:
            row["correction"] = 1
        row["exchange"] = exch
        row["id"] = str(seq)
        row["participant_timestamp"] = pts
        row["price"] = price_t / div
        row["sequence_number"] = number
        row["sip_timestamp"] = sip
        row["size"] = size
        row["tape"] = tape
        if exch == 4:
            row["trf_id"] = _TRF_IDS[int(r() * 3)]
            row["trf_timestamp"] = pts - 1_000 - int(r() * 500_000)
        append(dumps(row))
        if dup_rng is not None:
            out_sips.append(sip)
            if twice:
                append(rows[-1])
                out_sips.append(sip)
    return rows, out_sips


def _gen_quotes(r: Any, sips: list[int], seq_base: int, tp: _TickerParams, center: int) -> list[bytes]:
    dumps = _compact_dumps
    div = tp.div
    tape = tp.tape
    smax = tp.spread_max
    n_exch = len(_QUOTE_EXCH)
    bid_t = max(2, center - max(1, smax // 2))
    rows: list[bytes] = []
    append = rows.append
    seq = seq_base
    for sip in sips:
        seq += 1
        u = r()
        if u < 0.25:
            bid_t += 1
        elif u < 0.5 and bid_t > 2:
            bid_t -= 1
        # ~0.5% locked (ask == bid) or crossed (ask < bid) markets, as real NBBO feeds show.
        ask_t = bid_t - int(r() < 0.3) if r() < 0.005 else bid_t + 1 + int(r() * smax)
        row: dict[str, Any] = {
            "ask_exchange": _QUOTE_EXCH[int(r() * n_exch)],
            "ask_price": ask_t / div,
            "ask_size": 1 + int(r() * r() * 40),
            "bid_exchange": _QUOTE_EXCH[int(r() * n_exch)],
            "bid_price": bid_t / div,
            "bid_size": 1 + int(r() * r() * 40),
        }
        if r() < 0.04:
            row["conditions"] = [1]
        if r() < 0.02:
            row["indicators"] = [604]
        row["participant_timestamp"] = sip - 50_000 - int(r() * 2_950_001)
        row["sequence_number"] = seq
        row["sip_timestamp"] = sip
        row["tape"] = tape
        append(dumps(row))
    return rows


class _MinuteCache:
    """Thread-safe LRU of generated minutes, bounded by minute count and approximate bytes."""

    def __init__(self, max_minutes: int = 8192, max_bytes: int = 384 << 20) -> None:
        self.max_minutes = max_minutes
        self.max_bytes = max_bytes
        self._d: OrderedDict[tuple[str, str, int, Dups], _Minute] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(
        self, kind: str, ticker: str, m: int, minute_of_day: int, day_ord: int, dups: Dups = NO_DUPS
    ) -> _Minute:
        dups = dups if kind == "trades" else NO_DUPS
        key = (kind, ticker, m, dups)
        with self._lock:
            md = self._d.get(key)
            if md is not None:
                self._d.move_to_end(key)
                return md
        # Generate outside the lock: a duplicate generation is harmless (deterministic), a stall is not.
        md = _generate(kind, ticker, m, minute_of_day, day_ord, dups)
        with self._lock:
            old = self._d.get(key)
            if old is not None:
                return old
            self._d[key] = md
            self._bytes += md.nbytes
            while len(self._d) > self.max_minutes or (self._bytes > self.max_bytes and len(self._d) > 1):
                _, ev = self._d.popitem(last=False)
                self._bytes -= ev.nbytes
        return md

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0


_CACHE = _MinuteCache()


def clear_cache() -> None:
    """Drop all generated minutes (for cold-cache benchmarks and determinism tests)."""
    _CACHE.clear()


def _slice(md: _Minute, m: int, gte: int, lt: int) -> tuple[int, int]:
    """Index range of the minute's rows with gte <= sip < lt."""
    a = 0 if gte <= m else bisect_left(md.sips, gte)
    b = len(md.sips) if lt >= m + MINUTE_NS else bisect_left(md.sips, lt)
    return a, b


def ground_truth(
    kind: str, ticker: str, gte_ns: int, lt_ns: int, config: SimConfig | None = None
) -> list[dict[str, Any]]:
    """Every row with gte_ns <= sip_timestamp < lt_ns, ascending, exactly as the endpoints serve them.

    ``config``: a server's knobs that change the tape itself (duplicate sequence numbers and
    identical trades); None is the default tape.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out: list[dict[str, Any]] = []
    if liquidity(ticker) <= 0:
        return out
    gte_ns = max(gte_ns, DATA_START_NS)
    lt_ns = min(lt_ns, DATA_END_NS)
    for m, k, d in _iter_minutes(gte_ns, lt_ns, False):
        md = _CACHE.get(kind, ticker, m, k, d, _dups(config))
        a, b = _slice(md, m, gte_ns, lt_ns)
        if a < b:
            out.extend(orjson.loads(b"[" + b",".join(md.rows[a:b]) + b"]"))
    return out


# --------------------------------------------------------------------------------------------------
# Query parsing
# --------------------------------------------------------------------------------------------------


class _BadRequest(Exception):
    pass


_RE_INT = re.compile(r"\d{1,19}\Z")
_RE_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})\Z")
_RE_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?\Z"
)


def _day_bounds(y: int, mo: int, d: int) -> tuple[int, int]:
    ordinal = date(y, mo, d).toordinal()
    return _day(ordinal)[0], _day(ordinal + 1)[0]


def _parse_ts(name: str, value: str) -> tuple[int, int | None]:
    """Parse ns / RFC3339 / YYYY-MM-DD -> (instant, None) or (ET day start, next ET day start)."""
    v = value.strip()
    try:
        if _RE_INT.match(v):
            return int(v), None
        m = _RE_DATE.match(v)
        if m:
            return _day_bounds(int(m[1]), int(m[2]), int(m[3]))
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
    raise _BadRequest(
        f"Could not parse the '{name}' parameter value {value!r}: expected nanoseconds since the epoch, "
        "an RFC3339 timestamp or a YYYY-MM-DD date"
    )


@dataclass(frozen=True)
class _Query:
    kind: str
    ticker: str
    gte: int | None
    lt: int | None
    desc: bool
    limit: int
    pos: tuple[int, int] | None  # (sip_timestamp, sequence_number) of the last row already served
    cursor: bool


def _parse_params(kind: str, ticker: str, q: dict[str, str]) -> _Query:
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
        raise _BadRequest(f"Invalid value for 'order': {order!r} (must be 'asc' or 'desc')")
    sort = q.get("sort", "timestamp")
    if sort != "timestamp":
        raise _BadRequest(f"Invalid value for 'sort': {sort!r} (only 'timestamp' is supported)")
    raw_limit = q.get("limit", str(DEFAULT_LIMIT))
    if not _RE_INT.match(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise _BadRequest(
            f"Invalid value for 'limit': {raw_limit!r} (must be an integer from 1 to {MAX_LIMIT})"
        )
    return _Query(kind, ticker, gte, lt, order.lower() == "desc", int(raw_limit), None, False)


def _encode_cursor(qy: _Query, pos: tuple[int, int]) -> str:
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


def _decode_cursor(kind: str, ticker: str, cursor: str) -> _Query:
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
        raise _BadRequest(
            f"Invalid value for 'cursor': {cursor!r} (not a cursor issued for /v3/{kind}/{ticker})"
        )
    return _Query(kind, ticker, gte, lt, order == "desc", limit, pos, True)


# --------------------------------------------------------------------------------------------------
# Paging
# --------------------------------------------------------------------------------------------------


def _collect(
    qy: _Query, page_size: int, now_ns: int, dups: Dups = NO_DUPS, day_pages: bool = False
) -> tuple[list[tuple[_Minute, int, int]], bool]:
    """Segments (minute, a, b) forming the page in serve order, and whether more rows remain after it.

    ``day_pages``: the page ends after the last row of the first ET day it holds (with a cursor
    when more rows follow), so it may hold fewer than ``page_size`` rows.
    """
    segs: list[tuple[_Minute, int, int]] = []
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
    for m, k, d in _iter_minutes(lo, hi, qy.desc):
        md = _CACHE.get(qy.kind, qy.ticker, m, k, d, dups)
        if not md.sips:
            continue
        a, b = _slice(md, m, gte, lt)
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


def _row_at(segs: list[tuple[_Minute, int, int]], desc: bool, idx: int) -> tuple[int, int]:
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
# Config, records, server
# --------------------------------------------------------------------------------------------------


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


def max_in_window(times: list[float], seconds: float = 1.0) -> int:
    """Most of the sorted `times` inside any half-open window [t, t + seconds)."""
    best = j = 0
    for i in range(len(times)):
        while times[i] - times[j] >= seconds:
            j += 1
        best = max(best, i - j + 1)
    return best


@dataclass
class SimConfig:
    """Fault and behaviour knobs; read on every request, so tests may mutate them while running."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rate_limit_rps: float | None = None
    rate_limit_retry_after: bool = True
    error_5xx_rate: float = 0.0
    reset_rate: float = 0.0
    truncate_rate: float = 0.0
    page_cap: int | None = None
    #: pages end after each ET day's last row (a page may hold fewer than `limit` rows, next_url set)
    page_ends_at_day: bool = False
    #: share of trades that reuse the previous trade's sequence_number (genuine duplicates)
    duplicate_sequence_rate: float = 0.0
    #: share of trades served twice, identical in every field
    identical_trade_rate: float = 0.0
    #: share of requests answered 502/504 with a proxy's HTML page (text/html), not the API's JSON
    html_5xx_rate: float = 0.0
    #: share of requests read and never answered (no status line, connection held open)
    hang_rate: float = 0.0
    #: share of 200s whose headers and part of the body are sent, then nothing more
    stall_rate: float = 0.0
    keys: dict[str, str] | None = None
    seed: int = 0


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the server saw it (bounds are effective nanosecond bounds, None = unbounded)."""

    t: float
    endpoint: str
    ticker: str | None
    status: int
    gte_ns: int | None
    lt_ns: int | None
    cursor: bool
    rows: int
    had_api_key_in_query: bool
    truncated: bool = False
    handled: float = 0.0  # when a handler thread got to it (t is when its bytes arrived)
    hung: bool = False  # never answered (hang_rate) or stalled mid-body (stall_rate)
    html: bool = False  # a proxy's HTML error page (html_5xx_rate)


@dataclass(frozen=True)
class _Arrival:
    """What was decided when a request arrived (fault draws are taken then, under the lock)."""

    now: float
    handled: float
    reset: bool
    limited: bool
    retry_after: int
    u_5xx: float
    u_code: float
    u_trunc: float
    u_mode: float
    u_cut: float
    u_lat: float
    hang: bool = False  # read and never answered
    stall: bool = False  # headers and part of the body, then nothing
    html: bool = False  # a proxy's 502/504 HTML page instead of the API's answer
    u_proxy: float = 0.0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: Simulator, family: int) -> None:
        self.address_family = family
        self.sim = sim
        self.conns: set[socket.socket] = set()
        self.rst: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); skip it, we are loopback only.
        socketserver.TCPServer.server_bind(self)
        if _SO_TIMESTAMPNS is not None:  # accepted sockets inherit it, so a first request is stamped
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.discard(request)
            rst = request in self.rst
            self.rst.discard(request)
        if rst:
            request.close()  # SO_LINGER 0 is set: close() sends RST, no FIN from shutdown()
        else:
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # client went away; normal under fault injection and pool churn
        traceback.print_exc(file=sys.stderr)

    def close_all(self) -> None:
        with self.conns_lock:
            conns = list(self.conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


# Linux stamps every received segment for a socket with SO_TIMESTAMPNS set. A request's arrival is
# the stamp of the segment that carried it: when the server *received* it, which is what a real
# server's limiter counts, not when a Python handler thread next got the GIL to parse it (that lag
# reaches tens of ms while other handlers build large bodies, and it would let the simulator count
# requests that arrived 1.02 s apart inside one second).
_LINUX_SO_TIMESTAMPNS = 35 if sys.platform.startswith("linux") else None
_SO_TIMESTAMPNS: int | None = getattr(socket, "SO_TIMESTAMPNS", _LINUX_SO_TIMESTAMPNS)
_CMSG_SPACE = socket.CMSG_SPACE(16) if hasattr(socket, "CMSG_SPACE") else 0


class _StampedSocketReader(io.RawIOBase):
    """The handler's raw input: recvmsg so the kernel's receive stamp comes with the bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.stamp: float | None = None  # time.time() base, of the latest segment read

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n, ancillary, _flags, _addr = self._sock.recvmsg_into([b], _CMSG_SPACE)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack_from("qq", data)
                self.stamp = sec + nsec / 1e9
        return n


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server
    _stamped: _StampedSocketReader | None = None

    def setup(self) -> None:
        super().setup()
        if _SO_TIMESTAMPNS is not None and _CMSG_SPACE:
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            except OSError:
                return
            self._stamped = _StampedSocketReader(self.connection)
            self.rfile = io.BufferedReader(self._stamped, 65536)

    def handle_one_request(self) -> None:
        if self._stamped is not None:
            self._stamped.stamp = None  # a request already buffered (pipelined) has no own stamp
        super().handle_one_request()

    def arrival(self) -> float | None:
        """When this request's bytes reached the socket (time.time() base), if the kernel said."""
        return self._stamped.stamp if self._stamped is not None else None

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: per-request logging is slow and the path may carry apiKey."""

    def do_GET(self) -> None:
        self.server.sim._handle(self)

    def _not_found(self) -> None:
        self.close_connection = True  # we never read request bodies, so do not reuse the connection
        self.server.sim._handle(self, force_404=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_found

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, 501) in the same JSON shape, then close."""
        self.close_connection = True
        body = orjson.dumps({"status": "ERROR", "request_id": os.urandom(16).hex(), "error": message or ""})
        with contextlib.suppress(OSError):
            self.server.sim._write(self, code, body)


class Simulator:
    """Threaded loopback HTTP server speaking Polygon v3 trades/quotes, with counters and fault knobs."""

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        if not _is_loopback(host):
            raise ValueError(f"refusing to bind non-loopback host {host!r}")
        self.config = config if config is not None else SimConfig()
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._base_url: str | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._fault_rng = random.Random(self.config.seed)
        # the proxy faults draw from their own stream, so adding them moved no other fault
        self._proxy_rng = random.Random(f"proxy|{self.config.seed}")
        self._fault_seed = self.config.seed
        self._stopping = threading.Event()  # releases handlers that hang on purpose
        self._served: list[float] = []  # sorted arrival times of admitted requests
        self._active = 0
        self._reset_state()

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Simulator:
        if self._server is not None:
            return self
        self._stopping.clear()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = _Server((self.host, self.port), self, family)
        self.port = self._server.server_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._base_url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="smallcaps-simulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is None:
            return
        self._stopping.set()
        srv.shutdown()
        srv.server_close()
        srv.close_all()  # keep-alive connections would otherwise keep being served
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("Simulator not started")
        return self._base_url

    # ---- counters --------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._counts: dict[str, dict[str, int]] = {"trades": {}, "quotes": {}, "other": {}}
        self._total = 0
        self._bytes = 0
        self._max_conc = self._active
        self._log: deque[RequestRecord] = deque(maxlen=1_000_000)
        self._faults = dict.fromkeys(("reset", "truncated", "5xx", "429", "html_5xx", "hung", "stalled"), 0)

    def reset_counters(self) -> None:
        """Zero counters and the request log (the rate limiter's window is server state and is kept)."""
        with self._lock:
            self._reset_state()

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": {k: dict(v) for k, v in self._counts.items()},
                "total": self._total,
                "max_concurrency": self._max_conc,
                "bytes": self._bytes,
                "faults": dict(self._faults),
            }

    def request_log(self) -> list[RequestRecord]:
        with self._lock:
            log = list(self._log)
        log.sort(key=lambda r: r.t)  # records are appended on completion; report arrival order
        return log

    def max_in_window(self, seconds: float = 1.0, served_only: bool = False, handled: bool = False) -> int:
        """Max request arrivals inside any half-open window [t, t + seconds).

        ``handled=True`` counts by when a handler thread got to each request instead (diagnostic).
        """
        log = [r for r in self.request_log() if not served_only or r.status == 200]
        return max_in_window(sorted(r.handled if handled else r.t for r in log), seconds)

    # ---- request handling ------------------------------------------------------------------------

    @staticmethod
    def _frame(
        status: int,
        body: bytes,
        extra: list[str] | None,
        declared_len: int | None,
        close: bool,
        html: bool = False,
    ) -> tuple[bytes, bytes]:
        head = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Content-Type: text/html" if html else "Content-Type: application/json",
            f"Content-Length: {len(body) if declared_len is None else declared_len}",
        ]
        if not html:  # a proxy's page is not the API's (nor the simulator's) answer
            head.append("X-Smallcaps-Simulator: 1")
        if extra:
            head.extend(extra)
        if close:
            head.append("Connection: close")
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"), body

    @staticmethod
    def _send(h: _Handler, head: bytes, body: bytes) -> None:
        if len(body) < 65536:
            h.wfile.write(head + body)  # one segment for small responses
        else:
            h.wfile.write(head)
            h.wfile.write(body)

    def _hold(self, h: _Handler) -> None:
        """Keep the connection open and say nothing more, as a hung upstream behind a proxy does,
        until the client hangs up or the simulator stops (so ``stop`` never waits on it)."""
        h.close_connection = True
        conn = h.connection
        while not self._stopping.is_set():
            try:
                readable, _, _ = select.select([conn], [], [], 0.1)
                if readable and not conn.recv(1, socket.MSG_PEEK):
                    return  # the client closed its end
            except OSError:
                return
            if readable:  # the client sent more (a pipelined request): it stays unanswered
                self._stopping.wait(0.1)

    def _write(self, h: _Handler, status: int, body: bytes) -> None:
        """Send a response outside the normal path (protocol errors); not counted."""
        self._send(h, *self._frame(status, body, None, None, h.close_connection))

    @staticmethod
    def _route(path: str) -> tuple[str, str | None]:
        parts = path.split("/")
        if len(parts) == 4 and parts[0] == "" and parts[1] == "v3" and parts[2] in KINDS and parts[3]:
            return parts[2], unquote(parts[3])
        return "other", None

    def _api_key(self, h: _Handler, q: dict[str, str]) -> str:
        auth = h.headers.get("Authorization") or ""
        if auth[:7].lower() == "bearer " and auth[7:].strip():
            return auth[7:].strip()
        return q.get("apiKey", "")

    def _handle(self, h: _Handler, force_404: bool = False) -> None:
        cfg = self.config
        q: dict[str, str] = {}
        try:
            split = urlsplit(h.path)
            path = split.path
            for k, v in parse_qsl(split.query, keep_blank_values=True):
                q.setdefault(k, v)
        except ValueError:  # unparseable request target: answer 404 like any unknown path
            path = ""
        endpoint, ticker = ("other", None) if force_404 else self._route(path)
        qy: _Query | None = None
        bad: str | None = None
        if ticker is not None:
            try:
                qy = (
                    _decode_cursor(endpoint, ticker, q["cursor"])
                    if "cursor" in q
                    else _parse_params(endpoint, ticker, q)
                )
            except _BadRequest as e:
                bad = str(e)
        arr = self._arrive(cfg, h.arrival())
        try:
            self._respond(h, cfg, q, endpoint, ticker, qy, bad, arr)
        except OSError:
            h.close_connection = True
        finally:
            with self._lock:
                self._active -= 1

    def _arrive(self, cfg: SimConfig, stamp: float | None = None) -> _Arrival:
        """Arrival bookkeeping, fault draws and the rate limiter, atomically under the lock.

        ``stamp`` is the kernel's receive time (time.time() base); the limiter and the request log
        count arrivals at that moment, converted to the monotonic clock. Handlers may reach this
        out of arrival order, so the limiter keeps arrivals sorted and admits a request only if no
        window of the limit's length that contains it would then hold more than the limit.
        """
        with self._lock:
            handled = time.monotonic()
            now = handled - max(0.0, time.time() - stamp) if stamp is not None else handled
            self._active += 1
            self._max_conc = max(self._max_conc, self._active)
            if cfg.seed != self._fault_seed:
                self._fault_rng.seed(cfg.seed)
                self._proxy_rng.seed(f"proxy|{cfg.seed}")
                self._fault_seed = cfg.seed
            u = [self._fault_rng.random() for _ in range(7)]
            p = [self._proxy_rng.random() for _ in range(4)]
            reset = u[0] < cfg.reset_rate
            proxy = {
                "hang": not reset and p[0] < cfg.hang_rate,
                "html": not reset and p[1] < cfg.html_5xx_rate,
                "stall": not reset and p[2] < cfg.stall_rate,
                "u_proxy": p[3],
            }
            limited = False
            retry_after = 1
            dq = self._served
            if not reset and cfg.rate_limit_rps is not None:
                rps = cfg.rate_limit_rps
                allowed = max(1, int(rps)) if rps >= 1 else 1
                window = 1.0 if rps >= 1 else 1.0 / max(rps, 1e-9)
                old = bisect_left(dq, handled - 2.0 * window - 1.0)
                if old:
                    del dq[:old]
                lo, mid, hi = (
                    bisect_right(dq, now - window),
                    bisect_right(dq, now),
                    bisect_left(dq, now + window),
                )
                if _fullest_window(dq, lo, mid, hi, window) >= allowed:
                    limited = True
                    retry_after = max(1, math.ceil(dq[lo] + window - now)) if lo < hi else 1
                else:
                    insort(dq, now)
            elif not reset:
                insort(dq, now)  # keep the window warm so turning the limiter on mid-run is exact
                if len(dq) > 100_000:
                    del dq[:50_000]
        return _Arrival(now, handled, reset, limited, retry_after, *u[1:], **proxy)

    def _respond(
        self,
        h: _Handler,
        cfg: SimConfig,
        q: dict[str, str],
        endpoint: str,
        ticker: str | None,
        qy: _Query | None,
        bad: str | None,
        arr: _Arrival,
    ) -> None:
        """Decide the response, record it, then send it (or reset the connection)."""
        delay = cfg.latency_ms + cfg.latency_jitter_ms * (2.0 * arr.u_lat - 1.0)
        if delay > 0:
            time.sleep(delay / 1000.0)
        rows = 0
        truncated = False
        extra: list[str] | None = None
        declared: int | None = None
        body = b""
        rid = os.urandom(16).hex()
        if arr.reset or arr.hang:
            status = 0  # no answer at all
        elif arr.limited:
            status = 429
            extra = [f"Retry-After: {arr.retry_after}"] if cfg.rate_limit_retry_after else None
            body = self._err(rid, error=_ERR_429)
        elif ticker is None:
            status = 404
            body = self._err(rid, "NOT_FOUND", message="Not found")
        else:
            status, body = self._auth(h, q, endpoint, cfg, rid)
        if status == 200 and arr.u_5xx < cfg.error_5xx_rate:
            status = (500, 502, 503)[min(2, int(arr.u_code * 3))]
            body = self._err(rid, error=_ERR_5XX)
        html = status not in (0, 429) and arr.html
        if html:  # a proxy in front of the API answers for it, whatever the API would have said
            status = 502 if arr.u_proxy < 0.5 else 504
            body = _PROXY_PAGE.format(code=status, phrase=HTTPStatus(status).phrase).encode()
        if status == 200 and (bad is not None or qy is None):
            status = 400
            body = self._err(rid, error=bad or "bad request")
        if status == 200 and qy is not None:
            try:
                body, rows = self._page(qy, rid, cfg)
            except Exception:  # a simulator bug must surface as a 500, not as a hung connection
                traceback.print_exc(file=sys.stderr)
                status, body = 500, self._err(rid, error=_ERR_5XX)
        stall = status == 200 and arr.stall and len(body) > 1
        if status == 200 and not stall and arr.u_trunc < cfg.truncate_rate and len(body) > 1:
            truncated = True
            cut = 1 + int(arr.u_cut * (len(body) - 1))
            if arr.u_mode < 0.5:
                h.close_connection = True  # promise the full length, send part, hang up
                declared = len(body)
            body = body[:cut]
        if stall:
            declared = len(body)
            body = body[: 1 + int(arr.u_proxy * (len(body) - 1))]
        head = b""
        if status:
            head, body = self._frame(status, body, extra, declared, h.close_connection, html)
        # Record before sending: a client that has its response must already see it in the log.
        rec = RequestRecord(
            t=arr.now,
            handled=arr.handled,
            endpoint=endpoint,
            ticker=ticker,
            status=status,
            gte_ns=qy.gte if qy else None,
            lt_ns=qy.lt if qy else None,
            cursor=qy.cursor if qy else "cursor" in q,
            rows=rows,
            had_api_key_in_query="apiKey" in q,
            truncated=truncated,
            hung=arr.hang or stall,
            html=html,
        )
        with self._lock:
            self._total += 1
            bucket = self._counts[endpoint]
            sk = "hung" if arr.hang else "stalled" if stall else str(status)
            bucket[sk] = bucket.get(sk, 0) + 1
            self._bytes += len(head) + len(body)
            self._log.append(rec)
            if arr.hang:
                self._faults["hung"] += 1
            elif stall:
                self._faults["stalled"] += 1
            elif html:
                self._faults["html_5xx"] += 1
            elif status == 0:
                self._faults["reset"] += 1
            elif status == 429:
                self._faults["429"] += 1
            elif status >= 500:
                self._faults["5xx"] += 1
            if truncated:
                self._faults["truncated"] += 1
        if arr.hang or stall:
            if stall:
                self._send(h, head, body)
            self._hold(h)
        elif arr.reset:
            h.close_connection = True
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with h.server.conns_lock:
                h.server.rst.add(h.connection)
        else:
            self._send(h, head, body)

    def _auth(
        self, h: _Handler, q: dict[str, str], endpoint: str, cfg: SimConfig, rid: str
    ) -> tuple[int, bytes]:
        """200 (with empty body) when the key may read this endpoint, else the 401/403 response."""
        key = self._api_key(h, q)
        if not key:
            return 401, self._err(rid, error=_ERR_NO_KEY)
        plan = "advanced" if cfg.keys is None else cfg.keys.get(key)
        if plan is None:
            return 401, self._err(rid, error=_ERR_BAD_KEY)
        if endpoint not in _PLANS.get(plan.lower(), frozenset()):
            return 403, self._err(rid, "NOT_AUTHORIZED", message=_MSG_NOT_ENTITLED)
        return 200, b""

    @staticmethod
    def _err(
        rid: str, status: str = "ERROR", *, error: str | None = None, message: str | None = None
    ) -> bytes:
        d: dict[str, str] = {"status": status, "request_id": rid}
        if error is not None:
            d["error"] = error
        if message is not None:
            d["message"] = message
        return orjson.dumps(d)

    def _page(self, qy: _Query, rid: str, cfg: SimConfig) -> tuple[bytes, int]:
        """Assemble a 200 body by joining cached row bytes; returns (body, rows)."""
        size = qy.limit if cfg.page_cap is None else max(1, min(qy.limit, cfg.page_cap))
        segs, more = _collect(qy, size, time.time_ns(), _dups(cfg), cfg.page_ends_at_day)
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
            pos = _row_at(segs, qy.desc, total - 1)
            path = f"/v3/{qy.kind}/{quote(qy.ticker, safe='.')}"
            url = f"{self.base_url}{path}?cursor={_encode_cursor(qy, pos)}"
            out += [b',"next_url":"', url.encode(), b'"']
        out.append(b"}")
        return b"".join(out), total


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run a standalone simulator until SIGINT/SIGTERM (for the demo and out-of-process benchmarks)."""
    p = argparse.ArgumentParser(
        prog="python -m smallcaps_ingest.simulator", description="Polygon v3 simulator"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--rate-limit-rps", type=float, default=None)
    p.add_argument("--no-retry-after", action="store_true")
    p.add_argument("--error-5xx-rate", type=float, default=0.0)
    p.add_argument("--reset-rate", type=float, default=0.0)
    p.add_argument("--truncate-rate", type=float, default=0.0)
    p.add_argument("--page-cap", type=int, default=None)
    p.add_argument("--page-ends-at-day", action="store_true")
    p.add_argument("--duplicate-sequence-rate", type=float, default=0.0)
    p.add_argument("--identical-trade-rate", type=float, default=0.0)
    p.add_argument("--html-5xx-rate", type=float, default=0.0)
    p.add_argument("--hang-rate", type=float, default=0.0)
    p.add_argument("--stall-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEY=PLAN",
        help="restrict keys (repeatable); plans: advanced, developer, basic",
    )
    a = p.parse_args(argv)
    if not _is_loopback(a.host):
        p.error(f"refusing non-loopback host {a.host!r}")
    keys = None
    if a.key:
        keys = {}
        for kv in a.key:
            k, sep, plan = kv.partition("=")
            if not sep or not k:
                p.error(f"--key expects KEY=PLAN, got {kv!r}")
            keys[k] = plan
    cfg = SimConfig(
        latency_ms=a.latency_ms,
        latency_jitter_ms=a.jitter_ms,
        rate_limit_rps=a.rate_limit_rps,
        rate_limit_retry_after=not a.no_retry_after,
        error_5xx_rate=a.error_5xx_rate,
        reset_rate=a.reset_rate,
        truncate_rate=a.truncate_rate,
        page_cap=a.page_cap,
        page_ends_at_day=a.page_ends_at_day,
        duplicate_sequence_rate=a.duplicate_sequence_rate,
        identical_trade_rate=a.identical_trade_rate,
        html_5xx_rate=a.html_5xx_rate,
        hang_rate=a.hang_rate,
        stall_rate=a.stall_rate,
        keys=keys,
        seed=a.seed,
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    sim = Simulator(cfg, host=a.host, port=a.port).start()
    print(f"simulator listening on {sim.base_url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
