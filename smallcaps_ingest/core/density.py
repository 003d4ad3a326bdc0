"""Expected ticks per second by symbol, endpoint and session: the priors, what was observed, and
rows between two instants (what the planner's cost and over-fetch bounds are computed on).

Densities are learned per symbol, endpoint and session segment from what was already fetched, and
shrunk towards the symbol's own level (its observed rows over what the priors predicted, in every
segment of that endpoint, else of the other endpoint) times the prior shape: a name seen only in
RTH is planned at its own level in PM too, and a sparse name's rarely seen OPEN half hour does not
fall back to the market-wide prior (which made merged ranges look less over-fetched than they were).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from smallcaps_ingest import storage
from smallcaps_ingest.core.trading_calendar import HOLIDAYS, is_trading_day

try:  # POSIX: an exclusive lock while merging into the density file
    import fcntl
except ImportError:  # Windows: merged without a lock (the write itself stays atomic)
    fcntl = None  # type: ignore[assignment]

ET = ZoneInfo("America/New_York")
NS = 1_000_000_000
KINDS = ("trades", "quotes")
# Priors for a symbol never seen before (ticks per second by session); deliberately moderate.
# The first and last half hour of RTH (OPEN, CLOSE) are kept apart: they are about twice as dense,
# and a uniform RTH density let merged ranges spanning the open exceed the over-fetch bound.
PRIOR_DENSITY = {
    "trades": {"PM": 0.2, "OPEN": 4.0, "RTH": 2.0, "CLOSE": 4.0, "AH": 0.2, "OFF": 0.0},
    "quotes": {"PM": 1.0, "OPEN": 20.0, "RTH": 10.0, "CLOSE": 20.0, "AH": 1.0, "OFF": 0.0},
}
# Weight, in seconds of observation, that a segment's base (the symbol's level times the prior
# shape) keeps against what was measured in that segment.
PRIOR_SECONDS = 60.0
# Weight, in rows, that the market-wide prior level (1.0) keeps against a symbol's observed level.
PRIOR_LEVEL_ROWS = 10.0
# (end hour, end minute, segment) in America/New_York
SESSION_BOUNDS = (
    (4, 0, "OFF"),
    (9, 30, "PM"),
    (10, 0, "OPEN"),
    (15, 30, "RTH"),
    (16, 0, "CLOSE"),
    (20, 0, "AH"),
    (24, 0, "OFF"),
)


def et_day(ns: int) -> str:
    return datetime.fromtimestamp(ns / NS, UTC).astimezone(ET).strftime("%Y-%m-%d")


@functools.lru_cache(maxsize=8192)
def _day_sessions(day: date) -> tuple[tuple[int, str], ...]:
    """One ET calendar day as (end ns, segment) pairs from its midnight; a day without a session
    (weekend, NYSE holiday: ``trading_calendar``) is one OFF, so a range across it costs nothing.

    Edges are wall-clock times resolved through the zone, so DST days (23 or 25 hours) are right."""
    midnight = datetime(day.year, day.month, day.day, tzinfo=ET)

    def edge(minutes: int) -> int:
        return int((midnight + timedelta(minutes=minutes)).astimezone(UTC).timestamp()) * NS

    if not is_trading_day(day):
        return ((edge(24 * 60), "OFF"),)
    return tuple((edge(hour * 60 + minute), name) for hour, minute, name in SESSION_BOUNDS)


def session_segments(start_ns: int, end_ns: int) -> list[tuple[str, float]]:
    """Split [start, end) at the ET session boundaries: [(session, seconds), ...].

    Integer arithmetic on each day's cached edges: the planner calls this for every gap between a
    symbol's windows on the engine's main thread, and resolving every edge through the zone held
    the GIL the workers need (benchmarks/README.md, decision record D8)."""
    out: list[tuple[str, float]] = []
    cur = start_ns
    day = datetime.fromtimestamp(start_ns // NS, UTC).astimezone(ET).date()
    while cur < end_ns:
        for edge_ns, name in _day_sessions(day):
            if edge_ns <= cur:
                continue
            nxt = min(edge_ns, end_ns)
            out.append((name, (nxt - cur) / NS))
            cur = nxt
            if cur >= end_ns:
                break
        day += timedelta(days=1)
    return out


_EPOCH_MONDAY = date(1970, 1, 5).toordinal()
_HOLIDAY_ORDINALS = sorted(d.toordinal() for d in HOLIDAYS)  # all weekdays


@functools.lru_cache(maxsize=65536)
def _hour_day(utc_hour: int) -> tuple[tuple[int, ...], tuple[str, ...], int, bool]:
    """The ET day holding a UTC hour: its segment edges (ns, midnight first), the segments' names,
    how many trading days came before it (from 1970-01-05), and whether it is one. ET midnight
    falls on a whole UTC hour (offsets are whole hours), so the hour decides the day."""
    day = datetime.fromtimestamp(utc_hour * 3600, UTC).astimezone(ET).date()
    midnight = int(datetime(day.year, day.month, day.day, tzinfo=ET).timestamp()) * NS
    sessions = _day_sessions(day)
    m = day.toordinal() - _EPOCH_MONDAY  # a Monday: counts stay small, so sums keep their precision
    return (
        (midnight, *(e for e, _ in sessions)),
        tuple(n for _, n in sessions),
        (m // 7) * 5 + min(m % 7, 5) - bisect.bisect_left(_HOLIDAY_ORDINALS, day.toordinal()),
        is_trading_day(day),
    )


def cumulative_rows(dens: dict[str, float]) -> Callable[[int], float]:
    """t -> expected rows from a fixed origin to t at densities ``dens`` (by session segment).

    The same sums as :func:`session_segments` (segments end at the same wall-clock edges; OFF and
    closed days' seconds are worth nothing, since OFF's density is 0 by construction), but any span's
    rows are one subtraction and each edge costs a cached lookup plus a few steps, instead of a
    walk over every day between two windows days apart (the planner's main cost on multi-day
    manifests)."""
    if dens.get("OFF", 0.0):
        raise ValueError("cumulative_rows assumes no ticks outside the sessions")
    day_rows = 0.0  # one trading day's
    bounds = ((0, "OFF"), *((h * 60 + m, n) for h, m, n in SESSION_BOUNDS))
    for (a, _), (b, name) in itertools.pairwise(bounds):
        day_rows += dens.get(name, 0.0) * (b - a) * 60

    def at(t_ns: int) -> float:
        edges, names, days_before, trading = _hour_day(t_ns // (3600 * NS))
        rows = day_rows * days_before
        if not trading:
            return rows
        for k, name in enumerate(names):
            start, end = edges[k], edges[k + 1]
            if t_ns >= end:
                rows += dens.get(name, 0.0) * (end - start) / NS
            else:
                return rows + dens.get(name, 0.0) * (t_ns - start) / NS
        return rows

    return at


class DensityStore:
    """Ticks per second by symbol, endpoint and session; persisted as JSON under the data dir.

    Kept with the run state so later runs (and later days in the same run) plan better. Updates
    are read-merge-written under an flock so concurrent runs do not lose each other's counts.

    A segment's density is its observed rows and seconds, shrunk (``PRIOR_SECONDS``) towards a
    base: the prior shape for that segment times the symbol's *level*, which is how many times
    the prior its observed rows were across all segments of the endpoint (shrunk towards 1 by
    ``PRIOR_LEVEL_ROWS``). A symbol never fetched on this endpoint takes the other endpoint's
    level; a symbol never fetched at all is planned on the priors (level 1).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path: Path | str | None = None
        if path is not None:  # an S3 URL stays a string (storage.py reads and writes it)
            self.path = str(path) if storage.is_remote(path) else Path(path)
        self._obs: dict[str, dict[str, dict[str, list[float]]]] = {}
        self._pending: dict[str, dict[str, dict[str, list[float]]]] = {}
        self._lock = threading.Lock()  # observe() runs on the engine's worker threads
        if self.path is not None:
            self._obs = self._read()

    def _read(self) -> dict:
        try:
            return json.loads(storage.read_bytes(self.path) or b"{}")
        except FileNotFoundError:
            return {}

    def _cells(self, symbol: str, kind: str) -> dict[str, tuple[float, float]]:
        with self._lock:
            return {s: (c[0], c[1]) for s, c in self._obs.get(symbol, {}).get(kind, {}).items()}

    def known(self, symbol: str) -> bool:
        """Whether any range of the symbol was observed; if not, it is planned on the priors (an
        engine can fetch such a symbol's trades first, so its quotes are planned at its level)."""
        with self._lock:
            return bool(self._obs.get(symbol))

    def level(self, symbol: str, kind: str) -> float:
        """Observed rows / prior-expected rows over the symbol's observations (1.0 if none)."""
        for k in (kind, *(k for k in KINDS if k != kind)):
            cells = self._cells(symbol, k)
            expected = sum(PRIOR_DENSITY[k].get(s, 0.0) * secs for s, (_, secs) in cells.items())
            if expected > 0:
                rows = sum(r for r, _ in cells.values())
                return (rows + PRIOR_LEVEL_ROWS) / (expected + PRIOR_LEVEL_ROWS)
        return 1.0

    def _density(self, kind: str, session: str, cells: dict[str, tuple[float, float]], level: float) -> float:
        base = PRIOR_DENSITY[kind][session] * level
        rows, secs = cells.get(session, (0.0, 0.0))
        return (rows + base * PRIOR_SECONDS) / (secs + PRIOR_SECONDS)

    def density(self, symbol: str, kind: str, session: str) -> float:
        return self._density(kind, session, self._cells(symbol, kind), self.level(symbol, kind))

    def densities(self, symbol: str, kind: str) -> dict[str, float]:
        """Ticks per second of every session segment (one consistent snapshot, for planning)."""
        cells, level = self._cells(symbol, kind), self.level(symbol, kind)
        return {s: self._density(kind, s, cells, level) for s in PRIOR_DENSITY[kind]}

    def expected_rows(self, symbol: str, kind: str, start_ns: int, end_ns: int) -> float:
        dens = self.densities(symbol, kind)
        return sum(dens[s] * secs for s, secs in session_segments(start_ns, end_ns))

    def observe(self, symbol: str, kind: str, start_ns: int, end_ns: int, rows: int) -> None:
        """Record that [start, end) held `rows` ticks, spread over its sessions by the prior shape."""
        segs = [(s, secs) for s, secs in session_segments(start_ns, end_ns) if secs > 0]
        weights = [PRIOR_DENSITY[kind][s] * secs for s, secs in segs]
        total = sum(weights)
        with self._lock:
            for (session, secs), w in zip(segs, weights, strict=True):
                share = rows * (w / total) if total > 0 else 0.0
                for store in (self._obs, self._pending):
                    cell = store.setdefault(symbol, {}).setdefault(kind, {}).setdefault(session, [0.0, 0.0])
                    cell[0] += share
                    cell[1] += secs

    def save(self) -> None:
        """Merge this process's new observations into the file (atomic replace, under flock where
        the platform has it; without it two hosts saving at the same instant may each miss the
        other's latest increments, never corrupt the file: densities are estimates)."""
        if self.path is None or not self._pending:
            return
        if isinstance(self.path, str):  # S3: no lock; read, merge, one PUT of the whole object
            self._merge_and_write()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            self._merge_and_write()

    def _merge_and_write(self) -> None:
        """On S3 two hosts saving at the same instant: the last PUT wins whole (the other's latest
        increments are lost, the object is never torn), which the estimates tolerate."""
        on_disk = self._read()
        for symbol, kinds in self._pending.items():
            for kind, sessions in kinds.items():
                for session, (rows, secs) in sessions.items():
                    cell = on_disk.setdefault(symbol, {}).setdefault(kind, {}).setdefault(session, [0, 0])
                    cell[0] += rows
                    cell[1] += secs
        storage.write_bytes(self.path, json.dumps(on_disk, sort_keys=True).encode())
        self._obs = on_disk
        self._pending = {}
