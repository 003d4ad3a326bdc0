"""Deterministic event manifests for the benchmarks.

Every event gets a window of [-3 min, +7 min] around its instant, on a trading day of 2024 (a
weekday that is no NYSE holiday: the simulator serves no ticks on holidays). Three shapes:

* ``isolated``  one event per symbol-day, so no two windows can share a request;
* ``clustered`` about half of the events come in clusters of 2-3 on one symbol-day, 1-4 min
  apart (their windows overlap); the rest are isolated;
* ``in_play``   3-6 events spread over one symbol's day (RTH mostly, weighted to the open, some
  PM/AH), on names whose simulator liquidity spans sparse (XELB 0.02) to dense (BRK.B 4, HVY 12).
* ``clustered_in_play`` the issue's clustered shape ("about half the events come in clusters of
  2-3 within a few minutes") placed on in-play days, where real small-cap events concentrate
  (halt/resume sequences and spikes on the day a name is in play), instead of one lone cluster or
  event per symbol-day: each symbol-day has 3-6 episodes timed as in ``in_play``, and each episode
  is a cluster with ``clustered``'s rule (probability 0.3, 2-3 events 1-4 min apart), else one
  event. Same universe as ``clustered``. Nothing here was tuned to a target: every parameter is
  taken from ``in_play`` or ``clustered`` as is.

Each shape also comes ``_multiday``: the same symbol-days, but laid out as the users' manifest is
(572,850 events over 1,621 symbols and 5 years: 0.28 events per symbol per trading day) instead
of one symbol-day per symbol. Each symbol in turn covers ``SPAN_WEEKDAYS`` consecutive trading days,
and each of them is one of its event days with probability 0.28 / (the shape's mean events per
symbol-day), so a sparse name's events fall days apart and ranges that cross days can serve them.

Generators are prefix-stable: ``make(kind, n)`` is the first events of ``make(kind, m)`` for
``n < m`` (up to the last symbol-day group), so runs of different sizes share their data.
``isolated`` and ``clustered`` draw from a universe of hash-named tickers whose simulator
liquidity is log-uniform in [0.05, 3] (plus AAOI, liquidity 1.0).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import _bootstrap  # noqa: F401

from smallcaps_ingest.core.plan import Window, et_day
from smallcaps_ingest.core.trading_calendar import is_trading_day
from smallcaps_ingest.simulator import LIQUIDITY, liquidity

ET = ZoneInfo("America/New_York")
NS = 1_000_000_000
BEFORE_NS = 3 * 60 * NS
AFTER_NS = 7 * 60 * NS
SHAPES = ("clustered", "clustered_in_play", "in_play", "isolated")
KINDS = SHAPES + tuple(f"{k}_multiday" for k in SHAPES)
#: The users' manifest: events per symbol per trading day (572,850 / 1,621 symbols / 1,260 days).
EVENTS_PER_SYMBOL_DAY = 572_850 / 1_621 / 1_260
#: Trading days each symbol covers in a ``_multiday`` manifest (about three months).
SPAN_WEEKDAYS = 60
#: Mean events per symbol-day of each shape (clusters: 30 % of episodes hold 2.5 events on average).
_PER_DAY = {"isolated": 1.0, "clustered": 1.45, "in_play": 4.5, "clustered_in_play": 4.5 * 1.45}
#: In-play names: explicit simulator tickers plus hash tickers picked across the liquidity range.
IN_PLAY_FIXED = ("BRK.B", "HVY", "AAOI", "XELB")


@dataclass(frozen=True)
class Event:
    symbol: str
    event_id: str
    start_ns: int
    end_ns: int

    @property
    def window(self) -> Window:
        return Window(self.event_id, self.start_ns, self.end_ns)


def trading_days(year: int = 2024) -> list[date]:
    d = date(year, 1, 1)
    out = []
    while d.year == year:
        if is_trading_day(d):
            out.append(d)
        d += timedelta(days=1)
    return out


_DAYS = trading_days()


def universe(n: int = 400, seed: int = 7) -> list[str]:
    """``n`` distinct 4-letter tickers (hash liquidity in [0.05, 3]) and AAOI, in a fixed order."""
    rng = random.Random(seed)
    seen: set[str] = set(LIQUIDITY)
    out = ["AAOI"]
    while len(out) < n:
        t = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def in_play_names(n_hash: int = 8, seed: int = 11) -> list[str]:
    """The fixed names plus ``n_hash`` hash tickers at evenly spaced liquidity quantiles."""
    pool = sorted(universe(400, seed), key=liquidity)
    picks = [pool[round(i * (len(pool) - 1) / max(1, n_hash - 1))] for i in range(n_hash)]
    names = list(IN_PLAY_FIXED) + [p for p in picks if p not in IN_PLAY_FIXED]
    return names


def _instant(day: date, minute_of_day: float) -> int:
    """UTC ns of ``minute_of_day`` minutes after ET midnight on ``day`` (whole seconds)."""
    midnight = datetime(day.year, day.month, day.day, tzinfo=ET)
    return int(midnight.timestamp()) * NS + int(minute_of_day * 60) * NS


def _minute(rng: random.Random, pm: float = 0.12, ah: float = 0.08, open_bias: float = 0.0) -> float:
    """Minute of the ET day: PM 07:00-09:27, AH 16:00-18:30, else RTH 09:33-15:53."""
    u = rng.random()
    if u < pm:
        return rng.uniform(7 * 60, 9 * 60 + 27)
    if u < pm + ah:
        return rng.uniform(16 * 60, 18 * 60 + 30)
    if rng.random() < open_bias:
        return rng.uniform(9 * 60 + 33, 11 * 60)
    return rng.uniform(9 * 60 + 33, 15 * 60 + 53)


def _ev(symbol: str, i: int, t_ns: int) -> Event:
    return Event(symbol, f"{symbol}_{i}", t_ns - BEFORE_NS, t_ns + AFTER_NS)


def _symbol_days(symbols: list[str], seed: int) -> Iterable[tuple[str, date]]:
    """Distinct (symbol, day) pairs: symbols round-robin, each on a different trading day each lap."""
    n_days = len(_DAYS)  # 252 = 4 * 7 * 9; a step of 13 is coprime, so laps never repeat a day
    offsets = {s: random.Random(f"{seed}|{s}").randrange(n_days) for s in symbols}
    lap = 0
    while lap < n_days:
        for s in symbols:
            yield s, _DAYS[(offsets[s] + 13 * lap) % n_days]
        lap += 1


def _spread_days(symbols: list[str], seed: int, per_day: float) -> Iterable[tuple[str, date]]:
    """(symbol, day) pairs, symbol after symbol, at the users' rate of events per symbol-day."""
    p = min(1.0, EVENTS_PER_SYMBOL_DAY / per_day)
    n_days = len(_DAYS)
    for s in symbols:
        rng = random.Random(f"{seed}|spread|{s}")
        first = rng.randrange(n_days - SPAN_WEEKDAYS)
        for day in _DAYS[first : first + SPAN_WEEKDAYS]:
            if rng.random() < p:
                yield s, day


def _days(shape: str, symbols: list[str], seed: int, multiday: bool) -> Iterable[tuple[str, date]]:
    return _spread_days(symbols, seed, _PER_DAY[shape]) if multiday else _symbol_days(symbols, seed)


def isolated(n: int, seed: int = 1, multiday: bool = False) -> list[Event]:
    rng = random.Random(seed)
    out: list[Event] = []
    for (sym, day), _ in zip(_days("isolated", universe(), seed, multiday), range(n), strict=False):
        out.append(_ev(sym, len(out), _instant(day, _minute(rng))))
    return out


def _episode(rng: random.Random, t: float, p_cluster: float) -> list[float]:
    """A cluster of 2-3 event minutes 1-4 min apart (prob. ``p_cluster``), else the one minute ``t``."""
    times = [t]
    if rng.random() < p_cluster:
        k = rng.choice((2, 3))
        for _ in range(k - 1):
            times.append(times[-1] + rng.uniform(1.0, 4.0))
    return times


def clustered(n: int, seed: int = 2, p_cluster: float = 0.3, multiday: bool = False) -> list[Event]:
    """Symbol-days hold a cluster of 2-3 events (prob. ``p_cluster``) or one isolated event."""
    rng = random.Random(seed)
    out: list[Event] = []
    for sym, day in _days("clustered", universe(), seed, multiday):
        if len(out) >= n:
            break
        for m in _episode(rng, _minute(rng), p_cluster):
            out.append(_ev(sym, len(out), _instant(day, m)))
    return out


def clustered_in_play(
    n: int, seed: int = 4, p_cluster: float = 0.3, multiday: bool = False
) -> list[Event]:
    """Symbol-days of 3-6 episodes (timed as ``in_play``), each a ``clustered`` episode."""
    rng = random.Random(seed)
    out: list[Event] = []
    for sym, day in _days("clustered_in_play", universe(), seed, multiday):
        if len(out) >= n:
            break
        k = rng.randint(3, 6)
        starts = sorted(_minute(rng, pm=0.15, ah=0.10, open_bias=0.5) for _ in range(k))
        for t in starts:
            for m in _episode(rng, t, p_cluster):
                out.append(_ev(sym, len(out), _instant(day, m)))
    return out


def in_play(n: int, seed: int = 3, multiday: bool = False) -> list[Event]:
    """Symbol-days of 3-6 events each, until at least ``n`` events."""
    rng = random.Random(seed)
    out: list[Event] = []
    # multiday: the in-play names first, then universe names (12 names do not hold every size)
    names = in_play_names()
    if multiday:
        names += [u for u in universe() if u not in names]
    for sym, day in _days("in_play", names, seed, multiday):
        if len(out) >= n:
            break
        k = rng.randint(3, 6)
        times = sorted(_minute(rng, pm=0.15, ah=0.10, open_bias=0.5) for _ in range(k))
        for m in times:
            out.append(_ev(sym, len(out), _instant(day, m)))
    return out


def make(kind: str, n: int, seed: int | None = None) -> list[Event]:
    shape = kind.removesuffix("_multiday")
    gen = {
        "isolated": isolated,
        "clustered": clustered,
        "clustered_in_play": clustered_in_play,
        "in_play": in_play,
    }[shape]
    multiday = kind != shape
    return gen(n, multiday=multiday) if seed is None else gen(n, seed, multiday=multiday)


def to_work(events: Iterable[Event]) -> dict[str, list[Window]]:
    """Manifest -> the ``{symbol: [Window, ...]}`` mapping that ``FetchEngine.run`` takes."""
    work: dict[str, list[Window]] = {}
    for e in events:
        work.setdefault(e.symbol, []).append(e.window)
    return work


def describe(events: list[Event]) -> str:
    syms = {e.symbol for e in events}
    days = {(e.symbol, et_day(e.start_ns + BEFORE_NS)) for e in events}
    liq = sorted(liquidity(s) for s in syms)
    lo, hi = (liq[0], liq[-1]) if liq else (0.0, 0.0)
    return (
        f"{len(events)} events, {len(syms)} symbols, {len(days)} symbol-days "
        f"({len(events) / max(1, len(days)):.2f} events each), liquidity {lo:.2f}-{hi:.2f}"
    )


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Print a benchmark manifest summary (and its first events).")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("-n", type=int, default=20)
    p.add_argument("--show", type=int, default=10)
    a = p.parse_args()
    ev = make(a.kind, a.n)
    print(describe(ev))
    for e in ev[: a.show]:
        t = datetime.fromtimestamp((e.start_ns + BEFORE_NS) / NS, ET)
        print(f"  {e.event_id:12s} {e.symbol:6s} liq={liquidity(e.symbol):5.2f} {t:%Y-%m-%d %a %H:%M:%S} ET")


if __name__ == "__main__":
    main()
