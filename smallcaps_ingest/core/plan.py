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

The rows between two instants come from ``density`` (learned per symbol, endpoint and session).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from smallcaps_ingest.core.cost import PAGE_ROWS, PAGES_ONLY, MergeRule
from smallcaps_ingest.core.density import (
    KINDS,
    NS,
    PRIOR_DENSITY,
    DensityStore,
    cumulative_rows,
    et_day,
    session_segments,
)

# the density names are re-exported: the planner's callers import them from here
__all__ = ["KINDS", "MAX_RUN_BLOCKS", "NS", "PAGE_ROWS", "PLAN_HORIZON", "PRIOR_DENSITY", "DensityStore",
           "RequestRange", "Window", "components", "cumulative_rows", "et_day", "overfetch_allowance",
           "partition", "plan_groups", "plan_kind", "plan_runs", "plan_symbol", "session_segments",
           "time_order", "within_bound"]

# Rows per second of CPU that parsing sustains: the exchange rate between over-fetched rows and
# saved requests (benchmarks/README.md, decision record D7).
PARSE_ROWS_PER_CPU_SECOND = 1_000_000
# A plan looks at most this many blocks back when extending a range (bounds the programme's cost).
MAX_RUN_BLOCKS = 64
# Windows of a symbol planned together (the plan's cost grows with it; merges reach no further).
PLAN_HORIZON = 64


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
    """Cheapest split of n blocks into contiguous runs [i, j) (the total of ``cost(span(i, j))``,
    then the fewest rows); a run of several blocks only within :func:`within_bound` and at most
    ``max_run`` blocks. ``need[k]``: rows of block k; ``span(i, j)``: rows from block i's start
    to block j-1's end (contiguous runs lose nothing: a range spanning blocks covers those between).
    """
    n = len(need)
    best: list[tuple[float, float]] = [(0.0, 0.0)] + [(math.inf, math.inf)] * n
    cut = [0] * (n + 1)
    before = list(itertools.accumulate(need, initial=0.0))
    for j in range(1, n + 1):
        inside = 0.0
        lo = max(0, j - max_run)
        # Gap rows (span - need) only grow further back, and no run ending at j needs more than
        # `reach`: past what the bound could ever allow, the look-back stops (same result).
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


def plan_runs(
    kind: str,
    need: Sequence[float],
    span: Callable[[int, int], float],
    max_overfetch: float,
    overfetch_rows: float,
    rule: MergeRule = PAGES_ONLY,
) -> list[tuple[int, int]]:
    """One endpoint's blocks split into ranges (:func:`partition` at ``rule``'s cost and row
    limit): what :func:`plan_kind` and the cost preview (``ops.plan_estimate``) both call."""
    return partition(need, span, max_overfetch, rule.cost, overfetch_rows, max_rows=rule.max_rows)


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
    runs = plan_runs(kind, need, lambda i, j: cum[2 * j - 1] - cum[2 * i], max_overfetch, overfetch_rows,
                     rule)
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
