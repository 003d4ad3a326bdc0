"""The synthetic market: a deterministic tape of trades and NBBO quotes for any ticker and minute.

Tick data is a pure function of (kind, ticker, UTC minute): every minute is generated from its own
seeded RNG, so any query, any page size, any server instance and :func:`ground_truth` agree byte
for byte. What the tape models, because the client must cope with it:

- sessions: pre-market 04:00-09:30 ET, regular hours with a U-shaped intensity, after-hours to
  20:00 ET, nothing overnight, nothing on weekends and NYSE holidays (``core.trading_calendar``);
- liquidity per ticker, from dead (no ticks ever) to dense names that need many pages a minute;
- sequence numbers that restart every ET trading day, as the real API's do;
- optional genuine duplicates (reused sequence numbers, trades served twice), see ``_gen_trades``;
- locked and crossed quotes, odd lots, trade conditions, TRF fields, sub-dollar prices.

Generated minutes are cached as pre-serialized row bytes, so a response is a ``join``.
"""

from __future__ import annotations

import math
import random
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from hashlib import blake2b
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from smallcaps_ingest.core.trading_calendar import is_trading_day
from smallcaps_ingest.simulator.config import SimConfig

ET = ZoneInfo("America/New_York")
NS = 1_000_000_000
MINUTE_NS = 60 * NS
#: No data before this instant (2000-01-01 00:00 ET); bounds unbounded queries so they terminate.
DATA_START_NS = 946_702_800 * NS
#: ... and none from 2200-01-01 on, so absurd far-future bounds cannot walk off the calendar.
DATA_END_NS = 7_258_118_400 * NS
MAX_TICKS_PER_MINUTE = 99_999
SEQ_STRIDE = 100_000
KINDS = ("trades", "quotes")
BASE_RATE = {"trades": 2.0, "quotes": 10.0}

#: Explicit liquidity multipliers for names the tests and demo rely on; others hash to [0.05, 3.0].
LIQUIDITY: dict[str, float] = {"AAOI": 1.0, "BRK.B": 4.0, "XELB": 0.02, "DEAD": 0.0, "ZZZZ": 0.0, "HVY": 12.0}

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


def day_bounds(y: int, mo: int, d: int) -> tuple[int, int]:
    """[ET midnight of the day, ET midnight of the next day) in UTC ns: what a ``YYYY-MM-DD`` bound means."""
    ordinal = date(y, mo, d).toordinal()
    return _day(ordinal)[0], _day(ordinal + 1)[0]


def iter_minutes(lo: int, hi: int, desc: bool) -> Iterator[tuple[int, int, int]]:
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


class Minute:
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


def tape_dups(cfg: SimConfig | None) -> Dups:
    """The knobs of ``cfg`` that change the tape itself (None: the plain tape)."""
    return NO_DUPS if cfg is None else (cfg.duplicate_sequence_rate, cfg.identical_trade_rate)


def _generate(
    kind: str, ticker: str, minute_ns: int, minute_of_day: int, day_ord: int, dups: Dups = NO_DUPS
) -> Minute:
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
        return Minute([], [], seq_base)
    rng = random.Random(_minute_seed(kind, ticker, minute_ns))
    n = _poisson(rng, rate * 60.0)
    if n == 0:
        return Minute([], [], seq_base)
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
    return Minute(sips, rows, seq_base)


def _compact_dumps(obj: Any) -> bytes:
    """orjson's bytes keep their over-allocated buffer; cached rows are copied to exact size so the
    minute cache holds the rows, not the slack."""
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
    numbers being unique: it counts positions (``api.row_at``).
    """
    rows: list[bytes] = []
    out_sips = sips if dup_rng is None else []
    seq = seq_base
    number = 0  # the previous trade's sequence_number (0: none yet in this minute)
    for sip in sips:
        seq += 1
        reuse, twice = (dup_rng() < dups[0], dup_rng() < dups[1]) if dup_rng is not None else (False, False)
        number = number if reuse and number else seq
        price_t, row = _trade_row(r, sip, seq, number, price_t, tp, extended)
        rows.append(_compact_dumps(row))
        if dup_rng is not None:
            out_sips.append(sip)
            if twice:
                rows.append(rows[-1])
                out_sips.append(sip)
    return rows, out_sips


def _trade_row(
    r: Any, sip: int, seq: int, number: int, price_t: int, tp: _TickerParams, extended: bool
) -> tuple[int, dict[str, Any]]:
    """One trade and the price (in ticks) it leaves: the price walks a tick at a time; round and
    odd lots, conditions by session, TRF fields on off-exchange (exchange 4) prints."""
    u = r()
    if u < 0.2:
        price_t += 1
    elif u < 0.4 and price_t > 1:
        price_t -= 1
    pts = sip - 50_000 - int(r() * 2_950_001)
    if r() < 0.72:
        size = 100 * _LOTS[int(r() * len(_LOTS))]
        odd = False
    else:
        size = 1 + int(r() * 99)
        odd = True
    exch = _TRADE_EXCH[int(r() * len(_TRADE_EXCH))]
    row: dict[str, Any] = {}
    if r() >= 0.4:
        if odd:
            row["conditions"] = [12, 37] if extended else [37]
        elif extended:
            row["conditions"] = [12]
        else:
            row["conditions"] = _COND_RTH[int(r() * len(_COND_RTH))]
    if r() < 0.001:
        row["correction"] = 1
    row["exchange"] = exch
    row["id"] = str(seq)
    row["participant_timestamp"] = pts
    row["price"] = price_t / tp.div
    row["sequence_number"] = number
    row["sip_timestamp"] = sip
    row["size"] = size
    row["tape"] = tp.tape
    if exch == 4:
        row["trf_id"] = _TRF_IDS[int(r() * 3)]
        row["trf_timestamp"] = pts - 1_000 - int(r() * 500_000)
    return price_t, row


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


class MinuteCache:
    """Thread-safe LRU of generated minutes, bounded by minute count and approximate bytes."""

    def __init__(self, max_minutes: int = 8192, max_bytes: int = 384 << 20) -> None:
        self.max_minutes = max_minutes
        self.max_bytes = max_bytes
        self._d: OrderedDict[tuple[str, str, int, Dups], Minute] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(
        self, kind: str, ticker: str, m: int, minute_of_day: int, day_ord: int, dups: Dups = NO_DUPS
    ) -> Minute:
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


CACHE = MinuteCache()


def clear_cache() -> None:
    """Drop all generated minutes (for cold-cache benchmarks and determinism tests)."""
    CACHE.clear()


def minute_slice(md: Minute, m: int, gte: int, lt: int) -> tuple[int, int]:
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
    for m, k, d in iter_minutes(gte_ns, lt_ns, False):
        md = CACHE.get(kind, ticker, m, k, d, tape_dups(config))
        a, b = minute_slice(md, m, gte_ns, lt_ns)
        if a < b:
            out.extend(orjson.loads(b"[" + b",".join(md.rows[a:b]) + b"]"))
    return out
