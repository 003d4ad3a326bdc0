"""Plan the fewest requests that cover a symbol's event windows.

The budget counts requests, not rows, and one page holds up to 50,000 rows. So windows that
overlap or touch are always fetched as one range, and separated windows on the same trading day
are fetched together when the merged range is expected to need fewer pages than the two apart.
Over-fetch is bounded: a merged range may hold at most ``max_overfetch`` times the rows its
events need (a bound that holds whatever the density estimate, since both sides scale with it).
Densities are learned per symbol, endpoint and session from what was already fetched.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

ET = ZoneInfo("America/New_York")
NS = 1_000_000_000
PAGE_ROWS = 50_000
# Plan against 80 % of a page: a range estimated just under one page must not spill into two.
PAGE_ROWS_PLANNED = 40_000
KINDS = ("trades", "quotes")
# Priors for a symbol never seen before (ticks per second by session); deliberately moderate.
# The first and last half hour of RTH (OPEN, CLOSE) are kept apart: they are about twice as dense,
# and a uniform RTH density let merged ranges spanning the open exceed the over-fetch bound.
PRIOR_DENSITY = {
    "trades": {"PM": 0.2, "OPEN": 4.0, "RTH": 2.0, "CLOSE": 4.0, "AH": 0.2, "OFF": 0.0},
    "quotes": {"PM": 1.0, "OPEN": 20.0, "RTH": 10.0, "CLOSE": 20.0, "AH": 1.0, "OFF": 0.0},
}
# Weight, in seconds of observation, that the prior keeps against what was measured.
PRIOR_SECONDS = 60.0
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


@dataclass(frozen=True)
class Window:
    event_id: str
    start_ns: int
    end_ns: int


@dataclass
class RequestRange:
    """One request range (followed through every page) and the events it serves."""

    kind: str
    start_ns: int
    end_ns: int
    events: list[Window] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / NS


def et_day(ns: int) -> str:
    return datetime.fromtimestamp(ns / NS, UTC).astimezone(ET).strftime("%Y-%m-%d")


def session_segments(start_ns: int, end_ns: int) -> list[tuple[str, float]]:
    """Split [start, end) at the ET session boundaries: [(session, seconds), ...]."""
    out: list[tuple[str, float]] = []
    cur = start_ns
    while cur < end_ns:
        local = datetime.fromtimestamp(cur / NS, UTC).astimezone(ET)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        session, boundary = "OFF", None
        prev = 0
        for hour, minute, name in SESSION_BOUNDS:
            b = hour * 60 + minute
            minute_of_day = local.hour * 60 + local.minute + local.second / 60 + local.microsecond / 6e7
            if prev <= minute_of_day < b:
                session = name
                edge = (midnight + timedelta(minutes=b)) if b < 24 * 60 else (midnight + timedelta(days=1))
                # recompute through the zone so DST days stay correct
                boundary = int(edge.astimezone(UTC).timestamp()) * NS
                break
            prev = b
        nxt = min(end_ns, boundary if boundary and boundary > cur else end_ns)
        out.append((session, (nxt - cur) / NS))
        cur = nxt
    return out


class DensityStore:
    """Ticks per second by symbol, endpoint and session; persisted as JSON under the data dir.

    Kept with the run state so later runs (and later days in the same run) plan better. Updates
    are read-merge-written under an flock so concurrent runs do not lose each other's counts.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else None
        self._obs: dict[str, dict[str, dict[str, list[float]]]] = {}
        self._pending: dict[str, dict[str, dict[str, list[float]]]] = {}
        self._lock = threading.Lock()  # observe() runs on the engine's worker threads
        if self.path is not None and self.path.exists():
            self._obs = json.loads(self.path.read_text() or "{}")

    def density(self, symbol: str, kind: str, session: str) -> float:
        prior = PRIOR_DENSITY[kind][session]
        rows, secs = self._obs.get(symbol, {}).get(kind, {}).get(session, [0.0, 0.0])
        return (rows + prior * PRIOR_SECONDS) / (secs + PRIOR_SECONDS)

    def expected_rows(self, symbol: str, kind: str, start_ns: int, end_ns: int) -> float:
        return sum(self.density(symbol, kind, s) * secs for s, secs in session_segments(start_ns, end_ns))

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
        """Merge this process's new observations into the file (atomic replace under flock)."""
        if self.path is None or not self._pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text() or "{}") if self.path.exists() else {}
            for symbol, kinds in self._pending.items():
                for kind, sessions in kinds.items():
                    for session, (rows, secs) in sessions.items():
                        cell = on_disk.setdefault(symbol, {}).setdefault(kind, {}).setdefault(session, [0, 0])
                        cell[0] += rows
                        cell[1] += secs
            tmp = self.path.with_suffix(f".tmp.{os.getpid()}")
            tmp.write_text(json.dumps(on_disk, sort_keys=True))
            os.replace(tmp, self.path)
            self._obs = on_disk
            self._pending = {}


def _pages(rows: float) -> int:
    return max(1, math.ceil(rows / PAGE_ROWS_PLANNED))


def plan_kind(
    symbol: str,
    kind: str,
    windows: Sequence[Window],
    density: DensityStore,
    max_overfetch: float = 4.0,
) -> list[RequestRange]:
    """Ranges for one endpoint: overlapping/adjacent windows always merge; separated windows on
    the same ET day merge when that saves pages and keeps over-fetch within the bound."""
    ordered = sorted(windows, key=lambda w: (w.start_ns, w.end_ns, w.event_id))
    # 1. union overlapping or touching windows (exact, no over-fetch)
    blocks: list[RequestRange] = []
    for w in ordered:
        if blocks and w.start_ns <= blocks[-1].end_ns:
            blocks[-1].end_ns = max(blocks[-1].end_ns, w.end_ns)
            blocks[-1].events.append(w)
        else:
            blocks.append(RequestRange(kind, w.start_ns, w.end_ns, [w]))

    def rows(start: int, end: int) -> float:
        return density.expected_rows(symbol, kind, start, end)

    # 2. greedily merge neighbouring blocks on the same day when it saves pages
    merged: list[RequestRange] = []
    needed: list[float] = []  # expected rows inside the event windows of each merged range
    for block in blocks:
        need = rows(block.start_ns, block.end_ns)
        if merged:
            cur = merged[-1]
            joint_need = needed[-1] + need
            joint = rows(cur.start_ns, block.end_ns)
            same_day = et_day(cur.start_ns) == et_day(block.end_ns - 1)
            saves = _pages(joint) < _pages(rows(cur.start_ns, cur.end_ns)) + _pages(need)
            bounded = joint <= max_overfetch * joint_need + 1e-9
            if same_day and saves and bounded:
                cur.end_ns = block.end_ns
                cur.events.extend(block.events)
                needed[-1] = joint_need
                continue
        merged.append(block)
        needed.append(need)
    return merged


def plan_symbol(
    symbol: str,
    windows: Iterable[Window],
    density: DensityStore,
    max_overfetch: float = 4.0,
    kinds: Sequence[str] = KINDS,
) -> list[RequestRange]:
    ws = list(windows)
    return [r for kind in kinds for r in plan_kind(symbol, kind, ws, density, max_overfetch)]


def group_by_day(windows: Iterable[Window]) -> dict[str, list[Window]]:
    """Events grouped by ET trading day (merges never cross days, so days plan independently)."""
    out: dict[str, list[Window]] = {}
    for w in sorted(windows, key=lambda w: (w.start_ns, w.event_id)):
        out.setdefault(et_day(w.start_ns), []).append(w)
    return out
