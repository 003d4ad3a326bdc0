"""The cost preview's estimate over a whole manifest: the engine's plan, without a Python object
per event where no merge is possible.

The engine walks :func:`plan.plan_groups` per symbol: a probe of a symbol never observed (its
first head's first group, at the priors with no allowance), then heads of ``PLAN_HORIZON``
windows split into ranges, each head's last group held back to be planned with what follows. Here:
* rows of every window and block come from :func:`plan_many.cumulative_rows_many` (the planner's
  own sums over arrays); gaps no run could bridge (:func:`plan_many.mergeable_gaps`) cut a symbol
  into components, and a component of one block is one range per endpoint (its pages);
* every other component, and every probe that is not one block, is split by :func:`plan.plan_runs`
  (what :func:`plan.plan_kind` calls, at the engine's merge rule) on the same heads, truncated
  blocks and held-back groups as ``plan_groups`` (``_Walk``), each distinct input planned once;
* a symbol with a block longer than a head, or a head that would be one group with windows left,
  goes through ``plan_groups`` itself (:func:`walk_symbol`, the reference ``test_plan_estimate``
  holds the fast path to, exactly).
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from smallcaps_ingest.config import Config
from smallcaps_ingest.core.cost import MergeRule, TransferModel, default_workers
from smallcaps_ingest.core.plan import (
    KINDS,
    NS,
    PAGE_ROWS,
    PLAN_HORIZON,
    DensityStore,
    Window,
    cumulative_rows,
    overfetch_allowance,
    plan_groups,
    plan_runs,
)
from smallcaps_ingest.core.plan_many import DayTable, cumulative_rows_many, mergeable_gaps

SESSIONS = ("PM", "RTH", "AH", "OFF")
# Bytes of a written file: a fixed part (footer, schema, empty pages) and a part per row, fitted on
# the simulator's ticks as store.encode_parquet writes them (benchmarks/plan_accuracy.py checks them).
FILE_BYTES = {"trades": 2_900, "quotes": 600}
ROW_BYTES = {"trades": 13.7, "quotes": 14.8}


@dataclass
class Tally:
    """Figures of one session (or of the total). Requests are fractional per session: a range's
    pages are shared equally among the events it serves."""

    events_to_fetch: int = 0
    requests: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    rows: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    bytes: float = 0.0

    def as_dict(self, max_rps: float) -> dict[str, Any]:
        total = sum(self.requests.values())
        return {
            "events_to_fetch": self.events_to_fetch,
            "requests": {**{k: round(v) for k, v in self.requests.items()}, "total": round(total)},
            "seconds": round(total / max_rps, 1),
            "rows": {**{k: round(v) for k, v in self.rows.items()}, "total": round(sum(self.rows.values()))},
            "bytes": round(self.bytes),
        }


@dataclass(frozen=True)
class Settings:
    """The engine's planning settings, from ``Config`` (as the run would use them)."""

    max_rps: float
    max_overfetch: float = 4.0
    overfetch_rows: int | None = None  # None: plan.overfetch_allowance(max_rps)
    quotes_hz: float = 1.0
    workers: int | None = None  # None: engine.default_workers(max_rps), as definitions.py

    @classmethod
    def from_config(cls, config: Config, max_rps: float | None = None) -> Settings:
        return cls(
            max_rps=max_rps if max_rps is not None else config.max_rps,
            max_overfetch=config.max_overfetch,
            overfetch_rows=config.overfetch_rows,
            quotes_hz=config.quotes_hz,
            workers=config.workers,
        )

    def rule(self, kind: str) -> MergeRule:
        """The engine's merge rule at the start of a run (the transfer model's priors)."""
        return TransferModel().rule(kind, self.workers or default_workers(self.max_rps), self.max_rps)

    @property
    def allowance(self) -> int:
        if self.overfetch_rows is None:
            return overfetch_allowance(self.max_rps)
        return max(0, self.overfetch_rows)


def _quote_rows(seconds: float, raw: float, hz: float) -> float:
    """Expected rows of a quotes file whose window of ``seconds`` holds ``raw`` quotes: the grid's
    buckets from the window's first quote on (those before it are left out); with hz 0, the raw
    quotes."""
    if hz <= 0:
        return raw
    if raw <= 0 or seconds <= 0:
        return 0.0
    return max(0.0, seconds - seconds / raw) * hz


def _quote_rows_many(seconds: np.ndarray, raw: np.ndarray, hz: float) -> np.ndarray:
    if hz <= 0:
        return raw
    ok = (raw > 0) & (seconds > 0)
    safe = np.where(ok, raw, 1.0)
    return np.where(ok, np.maximum(0.0, seconds - seconds / safe) * hz, 0.0)


def _pages(rows: np.ndarray) -> np.ndarray:
    return np.maximum(1, np.ceil(rows / PAGE_ROWS)).astype(np.int64)


def walk_symbol(
    symbol: str,
    todo: Sequence[tuple[Window, str]],
    density: DensityStore,
    settings: Settings,
    total: Tally,
    sessions: dict[str, Tally],
) -> None:
    """One symbol's figures by walking ``plan_groups`` event by event, as the engine would (a
    probe's ranges are recorded in ``density`` as the priors predict them)."""
    session_of = {w.event_id: s for w, s in todo}
    at = {k: cumulative_rows(density.densities(symbol, k)) for k in KINDS}
    for windows, ranges, probe in plan_groups(
        symbol, [w for w, _ in todo], density, settings.max_overfetch, overfetch_rows=settings.allowance,
        merge_rule=settings.rule,
    ):
        for w in windows:
            tally = sessions.setdefault(session_of[w.event_id], Tally())
            secs = (w.end_ns - w.start_ns) / NS
            trades = at["trades"](w.end_ns) - at["trades"](w.start_ns)
            quotes = _quote_rows(secs, at["quotes"](w.end_ns) - at["quotes"](w.start_ns), settings.quotes_hz)
            size = sum(FILE_BYTES.values()) + ROW_BYTES["trades"] * trades + ROW_BYTES["quotes"] * quotes
            for t in (tally, total):
                t.events_to_fetch += 1
                t.rows["trades"] += trades
                t.rows["quotes"] += quotes
                t.bytes += size
        for r in ranges:
            rows = at[r.kind](r.end_ns) - at[r.kind](r.start_ns)
            pages = max(1, math.ceil(rows / PAGE_ROWS))
            total.requests[r.kind] += pages
            share = pages / len(r.events)
            for w in r.events:
                sessions[session_of[w.event_id]].requests[r.kind] += share
            if probe:  # the engine learns the symbol's level from its probe: here, the prior's
                density.observe(symbol, r.kind, r.start_ns, r.end_ns, round(rows))
        if probe:
            at = {k: cumulative_rows(density.densities(symbol, k)) for k in KINDS}


class _Fallback(Exception):
    """A head that would be one group with windows left: planned by ``plan_groups`` itself."""


@dataclass
class _Blocks:
    """Blocks (overlapping or touching windows unioned) of windows sorted in ``time_order`` within
    each symbol: first window, window count, and each endpoint's expected rows at its edges."""

    sym: np.ndarray
    first: np.ndarray
    count: np.ndarray
    at_s: dict[str, np.ndarray]
    at_e: dict[str, np.ndarray]

    @classmethod
    def of(cls, sym: np.ndarray, start: np.ndarray, end: np.ndarray, ws: Mapping, we: Mapping) -> _Blocks:
        prev_end = (
            pl.DataFrame({"s": sym, "e": end})
            .select(pl.col("e").cum_max().shift(1).over("s"))
            .to_series()
            .fill_null(np.iinfo(np.int64).min)
            .to_numpy()
        )
        new = np.r_[True, sym[1:] != sym[:-1]] | (start > prev_end)
        first = np.flatnonzero(new)
        count = np.diff(np.r_[first, len(sym)])
        return cls(sym[first], first, count, {k: ws[k][first] for k in KINDS},
                   {k: np.maximum.reduceat(we[k], first) for k in KINDS})  # fmt: skip

    def need(self, k: str) -> np.ndarray:
        return self.at_e[k] - self.at_s[k]

    def gap(self, k: str) -> np.ndarray:
        return np.r_[self.at_s[k][1:] - self.at_e[k][:-1], 0.0]

    def mergeable(self, settings: Settings, allowance: float) -> np.ndarray:
        return np.logical_or.reduce(
            [
                mergeable_gaps(self.sym, self.need(k), self.gap(k), settings.max_overfetch, allowance)
                for k in KINDS
            ]
        )


class _Walk:
    """``plan_groups``' heads over each symbol's blocks after its probe, with the planner's split
    (:func:`plan.plan_runs`) for every piece of a component that is not a lone block. Blocks are
    numbered across symbols: ``W[b]`` = windows before block b, ``lo[b]``/``hi[b]`` its component."""

    def __init__(self, settings: Settings, allowance: float, blk: _Blocks, lo: np.ndarray, hi: np.ndarray,
                 we: Mapping[str, np.ndarray]):  # fmt: skip
        self.settings, self.allowance, self.we = settings, allowance, we
        self.memo: dict[tuple[bytes, ...], int] = {}  # planner input -> its index in self.plans
        self.plans: list[tuple[list[tuple[int, int, int]], list[int]]] = []
        self.blk, self.lo, self.hi = blk, lo.tolist(), hi.tolist()
        self.W = [*blk.first.tolist(), int(blk.first[-1] + blk.count[-1])]
        self.soft = np.unique(lo[hi - lo > 1]).tolist()
        self.ranges: list[tuple[int, int, int]] = []  # (kind index, first block, end block)
        self.wholes: list[tuple[int, int]] = []  # (first block, plan): a component planned whole
        # every block's edges relative to its component's start: a whole component's planner
        # input is a slice of these (its bytes key identical inputs, planned once)
        rel = []
        for k in KINDS:
            r = np.empty(2 * len(lo))
            r[0::2] = blk.at_s[k] - blk.at_s[k][lo]
            r[1::2] = blk.at_e[k] - blk.at_s[k][lo]
            rel.append(r.tobytes())
        self.rel_t, self.rel_q = rel

    def _plan(self, key: tuple[bytes, ...]) -> int:
        """The planner's ranges (blocks relative to the piece) and group starts, once per input."""
        got = self.memo.get(key)
        if got is not None:
            return got
        ranges: list[tuple[int, int, int]] = []
        starts: set[int] | None = None
        for ki, (k, raw) in enumerate(zip(KINDS, key, strict=True)):
            cum = np.frombuffer(raw).tolist()
            need = [cum[2 * i + 1] - cum[2 * i] for i in range(len(cum) // 2)]
            runs = plan_runs(k, need, lambda i, j, c=cum: c[2 * j - 1] - c[2 * i],
                             self.settings.max_overfetch, self.allowance, self.settings.rule(k))  # fmt: skip
            ranges += [(ki, i, j) for i, j in runs]
            st = {i for i, _ in runs}
            starts = st if starts is None else starts & st
        self.plans.append((ranges, sorted(starts or {0})))
        self.memo[key] = len(self.plans) - 1
        return self.memo[key]

    def piece(self, x: int, y: int, cut_w: int | None = None) -> list[tuple[int, int]]:
        """Plan blocks x..y-1 together (``cut_w``: the head ends before this window, inside block
        y-1); returns the groups [(first, end)], and keeps the ranges in ``self.last``."""
        if cut_w is None and x == self.lo[x] and y == self.hi[x]:
            key = (self.rel_t[16 * x : 16 * y], self.rel_q[16 * x : 16 * y])
        else:
            keys = []
            for k in KINDS:
                cum = np.empty(2 * (y - x))
                o = self.blk.at_s[k][x]
                cum[0::2] = self.blk.at_s[k][x:y] - o
                cum[1::2] = self.blk.at_e[k][x:y] - o
                if cut_w is not None:
                    cum[-1] = self.we[k][self.W[y - 1] : cut_w].max() - o
                keys.append(cum.tobytes())
            key = tuple(keys)
        ranges, cuts = self.plans[self._plan(key)]
        self.last = [(ki, x + i, x + j) for ki, i, j in ranges]
        return [(x + i, x + j) for i, j in itertools.pairwise([*cuts, y - x])]

    def whole(self, a: int, b: int) -> None:
        """Keep the ranges of the components from block a (a piece, if mid-component) to b."""
        lo, hi = self.lo, self.hi
        if a < b and hi[a] - lo[a] > 1:
            if lo[a] == a:
                key = (self.rel_t[16 * a : 16 * hi[a]], self.rel_q[16 * a : 16 * hi[a]])
                self.wholes.append((a, self._plan(key)))
            else:
                self.piece(a, hi[a])
                self.ranges += self.last
            a = hi[a]
        rel_t, rel_q, plan, keep = self.rel_t, self.rel_q, self._plan, self.wholes.append
        for c in self.soft[bisect_left(self.soft, a) : bisect_left(self.soft, b)]:
            keep((c, plan((rel_t[16 * c : 16 * hi[c]], rel_q[16 * c : 16 * hi[c]]))))

    def all_ranges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(kind index, first block, end block) of every range kept."""
        rows = list(self.ranges)
        if self.wholes:
            first, plan = (np.array(c, dtype=np.int64) for c in zip(*self.wholes, strict=True))
            flat = [np.array(p[0], dtype=np.int64).reshape(-1, 3) for p in self.plans]
            size = np.array([len(f) for f in flat])
            offs = np.r_[0, np.cumsum(size)[:-1]]
            table = np.concatenate(flat)
            n = size[plan]
            idx = np.repeat(offs[plan] - np.r_[0, np.cumsum(n)[:-1]], n) + np.arange(n.sum())
            got = table[idx] + np.c_[np.zeros(len(idx), np.int64), np.repeat(first, n), np.repeat(first, n)]
            if rows:
                got = np.r_[got, np.array(rows, dtype=np.int64)]
            return got[:, 0], got[:, 1], got[:, 2]
        got = np.array(rows, dtype=np.int64).reshape(-1, 3)
        return got[:, 0], got[:, 1], got[:, 2]

    def symbol(self, b0: int, b1: int) -> None:
        """Keep the ranges the engine yields for blocks b0..b1-1 (one symbol's) that are in a
        component of more than one block."""
        W, lo, hi, horizon = self.W, self.lo, self.hi, PLAN_HORIZON
        pos = b0
        while pos < b1:
            end_w = W[pos] + horizon
            if end_w >= W[b1]:
                self.whole(pos, b1)
                return
            bl = bisect_right(W, end_w - 1, pos, b1) - 1
            cut = W[bl + 1] > end_w
            first = max(pos, lo[bl])
            trunc = cut or hi[bl] > bl + 1
            y = bl + 1 if trunc else hi[bl]
            if hi[bl] - lo[bl] == 1:
                groups, last = [(bl, bl + 1)], []
            else:
                groups = self.piece(first, y, end_w if cut else None)
                last = self.last
            if first == pos and len(groups) == 1:
                if trunc:
                    raise _Fallback
                self.ranges += last
                pos = y
                continue
            self.whole(pos, first)
            g = groups[-1][0]
            self.ranges += [r for r in last if r[2] <= g]
            pos = g


def estimate_frame(todo: pl.DataFrame, density: DensityStore, settings: Settings) -> dict[str, Any]:
    """The figures of ``plan`` for the events of ``todo`` (columns ``event_id``, ``symbol``,
    ``start_ns``, ``end_ns``, ``session``); ``density`` is a scratch copy (probes are recorded)."""
    df = todo.sort("symbol", "start_ns", "end_ns")  # time_order; the event id only breaks ties
    keys = pl.col("symbol", "start_ns", "end_ns")
    if df.select(pl.all_horizontal(keys == keys.shift(1)).any()).item():
        df = todo.sort("symbol", "start_ns", "end_ns", "event_id")
    n, total, sessions = df.height, Tally(), {}
    names = df["symbol"].unique(maintain_order=True).to_list()
    code = (df["symbol"].rank("dense").cast(pl.Int64).to_numpy() - 1) if n else np.zeros(0, np.int64)
    first = np.searchsorted(code, np.arange(len(names)))
    rank = np.arange(n) - first[code]
    start, end = df["start_ns"].to_numpy(), df["end_ns"].to_numpy()
    known = np.array([density.known(s) for s in names], dtype=bool)
    allowance, horizon = settings.allowance, PLAN_HORIZON
    ws = {k: np.zeros(n) for k in KINDS}  # expected rows at each window's start and end
    we = {k: np.zeros(n) for k in KINDS}
    share = {k: np.zeros(n) for k in KINDS}  # each window's part of its ranges' pages
    pages = dict.fromkeys(KINDS, 0)
    probe_len = np.zeros(len(names), dtype=np.int64)
    table = DayTable(np.r_[start, end]) if n else None

    def rows_at(idx: np.ndarray, dens: Mapping[str, Mapping], by_symbol: bool = False) -> None:
        for t, out in ((start, ws), (end, we)):
            got = cumulative_rows_many(t[idx], *(dens[k] for k in KINDS), table=table,
                                       index=code[idx] if by_symbol else None)  # fmt: skip
            for k, v in zip(KINDS, got, strict=True):
                out[k][idx] = v

    def windows(lo: int, hi: int) -> list[Window]:
        return [Window(*t) for t in zip(df["event_id"][lo:hi].to_list(), start[lo:hi].tolist(),
                                        end[lo:hi].tolist(), strict=True)]  # fmt: skip

    cold = np.flatnonzero(~known)
    if cold.size:  # probes, planned at the priors with no allowance (plan_kind's rule)
        prior = {k: density.densities(names[cold[0]], k) for k in KINDS}
        head = np.flatnonzero(~known[code] & (rank < horizon))
        rows_at(head, prior)
        blk = _Blocks.of(code[head], start[head], end[head], {k: ws[k][head] for k in KINDS},
                         {k: we[k][head] for k in KINDS})  # fmt: skip
        merge = blk.mergeable(settings, 0.0)
        alone = ~merge & (blk.count < horizon)
        b0 = np.searchsorted(blk.sym, cold)
        lone = alone[b0]  # a probe that is one block: one range per endpoint, its pages
        syms, blocks = cold[lone], b0[lone]
        count, w0 = blk.count[blocks], first[syms]
        idx = np.repeat(w0 - np.r_[0, np.cumsum(count)[:-1]], count) + np.arange(count.sum())
        probe_len[syms] = count
        edges = (start[w0].tolist(), np.maximum.reduceat(end[head], blk.first)[blocks].tolist())
        seen = []
        for k in KINDS:
            rows = blk.at_e[k][blocks] - blk.at_s[k][blocks]
            p = _pages(rows)
            pages[k] += int(p.sum())
            share[k][idx] = np.repeat(p / count, count)
            seen.append([round(v) for v in rows.tolist()])
        for sym, a, b, *got in zip([names[i] for i in syms.tolist()], *edges, *seen, strict=True):
            for k, v in zip(KINDS, got, strict=True):  # the engine learns the level from its probe
                density.observe(sym, k, a, b, v)
        # any other probe: the first group of the planner's split of its head's first component
        comp = np.cumsum(np.r_[True, ~merge[:-1]]) - 1
        lo, hi = np.searchsorted(comp, comp), np.searchsorted(comp, comp, side="right")
        walk = _Walk(settings, 0.0, blk, lo, hi, {})
        edge_s, edge_e = start[head][blk.first].tolist(), np.maximum.reduceat(end[head], blk.first).tolist()
        for s, b in zip(cold[~lone].tolist(), b0[~lone].tolist(), strict=True):
            g = walk.piece(b, int(hi[b]))[0][1]
            w0 = int(first[s])
            for ki, x, y in walk.last:
                if y > g:
                    continue
                k = KINDS[ki]
                rows = float(blk.at_e[k][y - 1] - blk.at_s[k][x])
                p = max(1, math.ceil(rows / PAGE_ROWS))
                pages[k] += p
                w_lo, w_hi = w0 + walk.W[x] - walk.W[b], w0 + walk.W[y] - walk.W[b]
                share[k][w_lo:w_hi] = p / (w_hi - w_lo)
                density.observe(names[s], k, edge_s[x], edge_e[y - 1], round(rows))
            probe_len[s] = walk.W[g] - walk.W[b]

    # the rest of every symbol, at its densities (after its probe, as the engine plans it)
    rest = np.flatnonzero(rank >= probe_len[code])
    if not rest.size:
        return _figures(
            df, np.ones(n, dtype=bool), ws, we, share, pages, total, sessions, settings, names, known
        )
    dens = {k: [density.densities(s, k) for s in names] for k in KINDS}
    rows_at(rest, {k: {s: np.array([d[s] for d in dens[k]]) for s in dens[k][0]} for k in KINDS}, True)
    blk = _Blocks.of(code[rest], start[rest], end[rest], {k: ws[k][rest] for k in KINDS},
                     {k: we[k][rest] for k in KINDS})  # fmt: skip
    merge = blk.mergeable(settings, allowance)
    comp = np.cumsum(np.r_[True, ~merge[:-1]]) - 1  # component of each block
    comp_lo = np.searchsorted(comp, comp)  # its first block, and the one past its last
    comp_hi = np.searchsorted(comp, comp, side="right")
    lone = comp_hi - comp_lo == 1
    for k in KINDS:  # a lone block is one range per endpoint
        p = _pages(blk.need(k))
        pages[k] += int(p[lone].sum())
        share[k][rest] = np.repeat(np.where(lone, p / blk.count, 0.0), blk.count)
    vec = np.ones(n, dtype=bool)  # windows whose figures are summed here (not by walk_symbol)
    walk = _Walk(settings, allowance, blk, comp_lo, comp_hi, {k: we[k][rest] for k in KINDS})
    busy = np.unique(blk.sym[~lone | (blk.count >= horizon)])
    sym_lo = np.searchsorted(blk.sym, busy)
    sym_hi = np.searchsorted(blk.sym, busy, side="right")
    big = set(blk.sym[blk.count >= horizon].tolist())
    for s, b0, b1 in zip(busy.tolist(), sym_lo.tolist(), sym_hi.tolist(), strict=True):
        kept = len(walk.ranges), len(walk.wholes)
        try:
            if s in big:
                raise _Fallback
            walk.symbol(b0, b1)
        except _Fallback:
            del walk.ranges[kept[0] :], walk.wholes[kept[1] :]
            w0 = int(first[s] + probe_len[s])
            hi = int(first[s + 1]) if s + 1 < len(names) else n
            for k in KINDS:
                share[k][w0:hi] = 0.0
                pages[k] -= int(_pages(blk.need(k)[b0:b1])[lone[b0:b1]].sum())
            vec[w0:hi] = False
            todo_s = list(zip(windows(w0, hi), df["session"][w0:hi].to_list(), strict=True))
            walk_symbol(names[s], todo_s, density, settings, total, sessions)
    kind, a, b = walk.all_ranges()
    if kind.size:  # the planner's ranges: their pages, shared among their windows
        lo_w, hi_w = rest[blk.first[a]], rest[blk.first[b - 1]] + blk.count[b - 1]
        for ki, k in enumerate(KINDS):
            mine = kind == ki
            p = _pages(blk.at_e[k][b[mine] - 1] - blk.at_s[k][a[mine]])
            pages[k] += int(p.sum())
            length = (hi_w - lo_w)[mine]
            idx = np.repeat(lo_w[mine] - np.r_[0, np.cumsum(length)[:-1]], length) + np.arange(length.sum())
            share[k][idx] = np.repeat(p / length, length)
    return _figures(df, vec, ws, we, share, pages, total, sessions, settings, names, known)


def _figures(df, vec, ws, we, share, pages, total, sessions, settings, names, known) -> dict[str, Any]:
    """The result: every window's rows and bytes, its share of requests, summed by session."""
    secs = (df["end_ns"].to_numpy() - df["start_ns"].to_numpy()) / NS
    trades = we["trades"] - ws["trades"]
    quotes = _quote_rows_many(secs, we["quotes"] - ws["quotes"], settings.quotes_hz)
    size = sum(FILE_BYTES.values()) + ROW_BYTES["trades"] * trades + ROW_BYTES["quotes"] * quotes
    frame = pl.DataFrame({"session": df["session"], "t": trades, "q": quotes, "b": size,
                          "st": share["trades"], "sq": share["quotes"]}).filter(pl.Series(vec))  # fmt: skip
    by = frame.group_by("session").agg(pl.len(), pl.col("t", "q", "b", "st", "sq").sum())
    for row in by.iter_rows(named=True):
        for t in (sessions.setdefault(row["session"], Tally()), total):
            t.events_to_fetch += row["len"]
            t.rows["trades"] += row["t"]
            t.rows["quotes"] += row["q"]
            t.bytes += row["b"]
        sessions[row["session"]].requests["trades"] += row["st"]
        sessions[row["session"]].requests["quotes"] += row["sq"]
    for k in KINDS:
        total.requests[k] += pages[k]
    out = total.as_dict(settings.max_rps)
    out["max_rps"] = settings.max_rps
    order = [s for s in SESSIONS if s in sessions] + sorted(set(sessions) - set(SESSIONS))
    out["sessions"] = {s: sessions[s].as_dict(settings.max_rps) for s in order}
    out["symbols_to_fetch"] = len(names)
    out["symbols_without_density"] = int((~known).sum())
    return out
