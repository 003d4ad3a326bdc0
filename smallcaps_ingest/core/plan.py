"""Plan the fewest requests that cover a symbol's event windows.

The budget counts requests, not rows, and one page holds up to 50,000 rows. So windows that
overlap or touch are always fetched as one range, and separated windows are fetched together when
that is expected to need fewer pages. The blocks are partitioned optimally (a small dynamic
programme over contiguous runs of blocks), not merged greedily, so a dense block is left on its
own while its sparse neighbours still share a range.

Over-fetch is bounded two ways, and a merged range must satisfy one of them (and, given a
``merge_rule``, hold no more rows than keep the budget the bottleneck: ``cost.TransferModel``):

* a ratio: at most ``max_overfetch`` times the rows its events need (a bound on the density's
  *shape* over the day, not on its level, since both sides scale with it); this is what lets
  windows minutes or hours apart on one day share a range;
* an allowance: at most ``overfetch_rows`` rows more than its events need. This is what lets a
  sparse name's events days apart share a range (a day of a small cap's trades often fits in one
  page, but is ~100x the rows of a 10-minute window, so no ratio would allow it). Being in rows,
  it is used only once something of the symbol was observed (its level is known). Its default
  (:func:`overfetch_allowance`) is what the client can parse in one request's share of the
  budget, so a saved request is never paid for with more CPU time than the request itself.

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
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from smallcaps_ingest.core.cost import PAGE_ROWS, PAGES_ONLY, MergeRule
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
# Rows per second of CPU that parsing sustains: the exchange rate between over-fetched rows and
# saved requests (benchmarks/README.md, decision record D7).
PARSE_ROWS_PER_CPU_SECOND = 1_000_000
# A plan looks at most this many blocks back when extending a range (bounds the programme's cost).
MAX_RUN_BLOCKS = 64
# Windows of a symbol planned together (the plan's cost grows with it; merges reach no further).
PLAN_HORIZON = 64
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


def time_order(w: Window) -> tuple[int, int, str]:
    """The order blocks, ranges and the engine's jobs all follow (start, end, event id): shared, so
    a prefix of the sorted windows is always a prefix of the planned groups."""
    return (w.start_ns, w.end_ns, w.event_id)


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
        self.path = Path(path) if path is not None else None
        self._obs: dict[str, dict[str, dict[str, list[float]]]] = {}
        self._pending: dict[str, dict[str, dict[str, list[float]]]] = {}
        self._lock = threading.Lock()  # observe() runs on the engine's worker threads
        if self.path is not None and self.path.exists():
            self._obs = json.loads(self.path.read_text() or "{}")

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text() or "{}") if self.path.exists() else {}
            for symbol, kinds in self._pending.items():
                for kind, sessions in kinds.items():
                    for session, (rows, secs) in sessions.items():
                        cell = on_disk.setdefault(symbol, {}).setdefault(kind, {}).setdefault(session, [0, 0])
                        cell[0] += rows
                        cell[1] += secs
            from smallcaps_ingest.core.store import atomic_write_bytes

            atomic_write_bytes(json.dumps(on_disk, sort_keys=True).encode(), self.path)
            self._obs = on_disk
            self._pending = {}


def _blocks(kind: str, windows: Sequence[Window]) -> list[RequestRange]:
    """Overlapping or touching windows unioned (exact, no over-fetch), in time order."""
    blocks: list[RequestRange] = []
    for w in sorted(windows, key=time_order):
        if blocks and w.start_ns <= blocks[-1].end_ns:
            blocks[-1].end_ns = max(blocks[-1].end_ns, w.end_ns)
            blocks[-1].events.append(w)
        else:
            blocks.append(RequestRange(kind, w.start_ns, w.end_ns, [w]))
    return blocks


def overfetch_allowance(max_rps: float) -> int:
    """Default ``overfetch_rows``: the rows the client parses in one request's share of the budget
    (1 / max_rps seconds), at most one page. 5 req/min or 10 req/s: a whole page (requests are the
    scarce resource); 90 req/s: ~11,000 rows (CPU is)."""
    if max_rps <= 0:
        return PAGE_ROWS
    return int(min(PAGE_ROWS, PARSE_ROWS_PER_CPU_SECOND / max_rps))


def within_bound(
    rows: float, need: float, max_overfetch: float, overfetch_rows: float, *, max_rows: float = math.inf
) -> bool:
    """Whether a range of ``rows`` serving windows that need ``need`` rows respects the bound, and
    holds at most ``max_rows`` (what keeps the budget the bottleneck: ``cost.TransferModel``)."""
    return rows <= max_rows and rows <= max(max_overfetch * need, need + overfetch_rows) * (1 + 1e-9)


def partition(
    need: Sequence[float],
    span: Callable[[int, int], float],
    max_overfetch: float,
    cost: Callable[[float], float],
    overfetch_rows: float = 0.0,
    max_run: int = MAX_RUN_BLOCKS,
    *,
    max_rows: float = math.inf,
) -> list[tuple[int, int]]:
    """Cheapest split of n blocks into contiguous runs [i, j): the total of ``cost(span(i, j))``,
    then the fewest rows; a run of several blocks only if ``span(i, j)`` is within the bound
    (:func:`within_bound`, ``max_rows`` included) of the rows its blocks need, and at most
    ``max_run`` blocks long.
    ``need[k]`` = rows of block k, ``span(i, j)`` = rows from block i's start to block j-1's end.
    (Contiguous runs lose nothing: a range spanning blocks covers those between.)
    """
    n = len(need)
    best: list[tuple[float, float]] = [(0.0, 0.0)] + [(math.inf, math.inf)] * n
    cut = [0] * (n + 1)
    before = list(itertools.accumulate(need, initial=0.0))
    for j in range(1, n + 1):
        inside = 0.0
        lo = max(0, j - max_run)
        # The gap rows (span - need) only grow as a run reaches further back, and no run ending at
        # j can need more than `reach`: once the gap exceeds what the bound could ever allow, no
        # longer run is valid either, so the look-back stops there (same result, far fewer steps
        # on multi-day manifests, where each day's gap exceeds the bound within a few blocks).
        reach = before[j] - before[lo]
        never = max((max_overfetch - 1) * reach, overfetch_rows) * (1 + 1e-6) + 1e-6 * reach + 1.0
        for i in range(j - 1, lo - 1, -1):
            inside += need[i]
            rows = span(i, j)
            if j - i > 1 and not within_bound(rows, inside, max_overfetch, overfetch_rows, max_rows=max_rows):
                if rows - inside > never or rows > max_rows:  # span only grows further back
                    break
                continue
            pages, fetched = best[i][0] + cost(rows), best[i][1] + rows
            # pages first; between (near-)equal page counts, the fewer rows
            if pages < best[j][0] - 1e-9 or (pages <= best[j][0] + 1e-9 and fetched < best[j][1]):
                best[j], cut[j] = (pages, fetched), i
    runs: list[tuple[int, int]] = []
    j = n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def plan_kind(
    symbol: str,
    kind: str,
    windows: Sequence[Window],
    density: DensityStore,
    max_overfetch: float = 4.0,
    overfetch_rows: float = 0.0,
    *,
    rule: MergeRule = PAGES_ONLY,
) -> list[RequestRange]:
    """Ranges for one endpoint: overlapping/adjacent windows always merge; separated windows share
    a range when that lowers the expected cost (``rule``: pages, by default), keeps over-fetch
    within the bound and holds at most ``rule.max_rows`` rows (the best such partition of all the
    blocks, across days when the allowance permits)."""
    blocks = _blocks(kind, windows)
    if len(blocks) <= 1:
        return blocks
    if not density.known(symbol):
        # the allowance is in rows, so it is only as good as the symbol's level: on the priors a
        # name 12x denser than assumed would fetch 12x the allowance (the ratio is level-free)
        overfetch_rows = 0.0
    dens = density.densities(symbol, kind)
    # expected rows up to every block edge, so any run's rows are one subtraction
    edges = [x for blk in blocks for x in (blk.start_ns, blk.end_ns)]
    at = cumulative_rows(dens)
    origin = at(edges[0])
    cum = [at(x) - origin for x in edges]
    need = [cum[2 * i + 1] - cum[2 * i] for i in range(len(blocks))]
    runs = partition(need, lambda i, j: cum[2 * j - 1] - cum[2 * i], max_overfetch, rule.cost, overfetch_rows,
                     max_rows=rule.max_rows)
    return [
        RequestRange(
            kind, blocks[i].start_ns, blocks[j - 1].end_ns, [w for b in blocks[i:j] for w in b.events]
        )
        for i, j in runs
    ]


def plan_symbol(
    symbol: str,
    windows: Iterable[Window],
    density: DensityStore,
    max_overfetch: float = 4.0,
    kinds: Sequence[str] = KINDS,
    overfetch_rows: float = 0.0,
    *,
    merge_rule: Callable[[str], MergeRule] | None = None,
) -> list[RequestRange]:
    """Every endpoint's ranges (:func:`plan_kind`); ``merge_rule(kind)``: how that endpoint's
    ranges may merge (``cost.TransferModel.rule``; None: fewest pages, no limit in rows)."""
    ws, rule = list(windows), merge_rule or (lambda _kind: PAGES_ONLY)
    return [r for kind in kinds
            for r in plan_kind(symbol, kind, ws, density, max_overfetch, overfetch_rows, rule=rule(kind))]


def components(
    windows: Sequence[Window], ranges: Sequence[RequestRange]
) -> list[tuple[list[Window], list[RequestRange]]]:
    """Split planned windows into groups no range crosses, in time order: each group can be fetched,
    shaped and written on its own (the engine's unit of work, so finished groups free their memory).

    Every range covers a contiguous run of the windows in ``time_order``, so a group ends
    between two neighbours that share no range of any endpoint.
    """
    order = sorted(windows, key=time_order)
    range_of: dict[str, dict[str, int]] = {}
    for idx, r in enumerate(ranges):
        for w in r.events:
            range_of.setdefault(r.kind, {})[w.event_id] = idx
    groups: list[tuple[list[Window], list[RequestRange]]] = []
    for k, w in enumerate(order):
        prev = order[k - 1].event_id if k else None
        shared = any(m.get(w.event_id, -1) == m.get(prev, -2) for m in range_of.values())
        if not shared:
            groups.append(([], []))
        groups[-1][0].append(w)
    first = {w.event_id: g for g, (ws, _) in enumerate(groups) for w in ws}
    for r in ranges:
        groups[first[r.events[0].event_id]][1].append(r)
    return groups


def plan_groups(
    symbol: str,
    todo: Sequence[Window],
    density: DensityStore,
    max_overfetch: float = 4.0,
    overfetch_rows: float = 0.0,
    horizon: int = PLAN_HORIZON,
    *,
    merge_rule: Callable[[str], MergeRule] | None = None,
) -> Iterator[tuple[list[Window], list[RequestRange], bool]]:
    """A symbol's groups (windows, ranges, probe?) in time order, planned ``horizon`` windows at a
    time, lazily: the engine fetches each group before asking for the next, and ``plan`` (the cost
    preview) walks the same sequence, so both see one planner.

    A symbol never observed is probed: its first group comes alone (``probe`` True), and the rest
    is planned only when the caller resumes, once the probe's rows have taught ``density`` the
    symbol's level (only then may ranges use the over-fetch allowance). The last group of a head
    is held back while windows remain beyond the horizon: its ranges might still merge with them.
    ``merge_rule`` (see :func:`plan_symbol`) is asked again for every head, so it follows what
    the responses so far taught it.
    """
    rest = sorted(todo, key=time_order)  # components() returns groups in this order
    while rest:
        probe = not density.known(symbol)
        head = rest[:horizon]
        ranges = plan_symbol(symbol, head, density, max_overfetch, overfetch_rows=overfetch_rows,
                             merge_rule=merge_rule)
        groups = components(head, ranges)
        if probe and len(groups) > 1:
            del groups[1:]
        elif len(rest) > len(head) and len(groups) > 1:
            groups.pop()
        for windows, rngs in groups:
            yield windows, rngs, probe
        rest = rest[sum(len(ws) for ws, _ in groups) :]
