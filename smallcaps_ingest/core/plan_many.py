"""The planner's per-window arithmetic over many windows at once (numpy), for the cost preview.

Nothing here decides a merge. :func:`cumulative_rows_many` is :func:`plan.cumulative_rows` for an
array of instants (each with its own densities), with the same floating-point operations in the
same order, so every value is bit-for-bit the scalar one. :func:`mergeable_gaps` only rules out:
it marks the gaps between blocks that *no* run of blocks could bridge under
:func:`plan.within_bound`, so what lies between two such gaps can be planned on its own (the
planner's dynamic programme splits there anyway); every other gap is left to the planner itself
(:func:`plan.plan_runs`). ``test_plan_many`` checks both against the scalar functions.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import polars as pl

from smallcaps_ingest.core.density import NS, SESSION_BOUNDS, _hour_day

_HOUR_NS = 3600 * NS
# the segments of a trading day, from midnight (the names _hour_day gives a trading day)
DAY_SEGMENTS = tuple(name for _, _, name in SESSION_BOUNDS)


class DayTable:
    """The ET days holding a set of instants, as arrays: each day's segment edges (ns, midnight
    first; a closed day's one OFF segment is padded with its end), trading days before it, and
    whether it is one; built from :func:`density._hour_day` once per day (not per instant)."""

    def __init__(self, t_ns: np.ndarray):
        hours = np.asarray(t_ns, dtype=np.int64) // _HOUR_NS
        lo = int(hours.min()) if hours.size else 0
        seen = np.zeros(int(hours.max()) - lo + 1 if hours.size else 0, dtype=bool)
        seen[hours - lo] = True
        present = np.flatnonzero(seen) + lo
        # one hour of each ET day (midnight falls on a whole UTC hour, so the hour decides the day)
        days = (
            pl.Series("h", present * _HOUR_NS)
            .cast(pl.Datetime("ns", "UTC"))
            .dt.convert_time_zone("America/New_York")
            .dt.date()
        )
        first = np.flatnonzero(np.r_[True, (days[1:] != days[:-1]).to_numpy()]) if len(days) else []
        width = len(DAY_SEGMENTS) + 1
        self.edges = np.zeros((len(first), width), dtype=np.int64)
        self.days_before = np.zeros(len(first), dtype=np.int64)
        self.trading = np.zeros(len(first), dtype=bool)
        for row, k in enumerate(first):
            edges, names, before, trading = _hour_day(int(present[k]))
            if trading and names != DAY_SEGMENTS:
                raise AssertionError(f"unexpected segments {names}")
            self.edges[row, : len(edges)] = edges
            self.edges[row, len(edges) :] = edges[-1]
            self.days_before[row], self.trading[row] = before, trading

    def day_of(self, t_ns: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges[:, 0], t_ns, side="right") - 1


def day_rows(dens: Mapping[str, np.ndarray]) -> np.ndarray:
    """One trading day's expected rows for each set of densities (``cumulative_rows``' sum)."""
    rows = np.zeros_like(next(iter(dens.values())), dtype=np.float64)
    bounds = ((0, "OFF"), *((h * 60 + m, n) for h, m, n in SESSION_BOUNDS))
    for (a, _), (b, name) in itertools.pairwise(bounds):
        rows = rows + dens[name] * (b - a) * 60
    return rows


def cumulative_rows_many(
    t_ns: np.ndarray,
    *dens: Mapping[str, np.ndarray | float],
    table: DayTable | None = None,
    index: np.ndarray | None = None,
) -> list[np.ndarray]:
    """``cumulative_rows(d)(t)`` for every instant ``t_ns[i]``, for each set of densities ``d`` in
    ``dens`` (per session segment: one value for all instants, one per instant, or with ``index``
    one per symbol, instant i taking ``d[s][index[i]]``): bit for bit the scalar sums (the same
    operations in the same order; buffers reused, since these arrays are large)."""
    t = np.asarray(t_ns, dtype=np.int64)
    if t.size == 0:
        return [np.zeros(0) for _ in dens]
    if any(np.any(d.get("OFF", 0.0)) for d in dens):
        raise ValueError("cumulative_rows assumes no ticks outside the sessions")
    table = table or DayTable(t)
    day = table.day_of(t)
    out = [day_rows(d) for d in dens]
    if index is not None:
        out = [np.take(r, index) for r in out]
    out = [np.multiply(r, table.days_before[day], dtype=np.float64) for r in out]
    # the scalar loop adds each segment ended before t, then t's part of its own, then stops; here
    # every segment adds its clipped part: those after t (and a closed day's padding) add 0.0 exactly
    lo, hi, inside, part = np.empty_like(t), np.empty_like(t), np.empty_like(t), np.empty(t.size)
    rate = np.empty(t.size) if index is not None else None
    edges = np.ascontiguousarray(table.edges.T)
    for k, name in enumerate(DAY_SEGMENTS):
        np.take(edges[k], day, out=lo)
        np.take(edges[k + 1], day, out=hi)
        np.clip(t, lo, hi, out=inside)
        np.subtract(inside, lo, out=inside)
        for i, d in enumerate(dens):
            np.multiply(d[name] if rate is None else np.take(d[name], index, out=rate), inside, out=part)
            np.divide(part, NS, out=part)
            np.add(out[i], part, out=out[i])
    return out


def _segmented(values: np.ndarray, seg: np.ndarray, accumulate: np.ufunc) -> np.ndarray:
    """``accumulate`` (maximum or minimum) restarted at every segment (``seg`` non-decreasing):
    each segment is shifted past the previous ones, so a running extreme never reaches back."""
    if values.size == 0:
        return values
    big = 2.0 * float(np.abs(values).max()) + 1.0
    sign = 1.0 if accumulate is np.maximum else -1.0
    shift = sign * big * (seg - seg[0])
    return accumulate.accumulate(values + shift) - shift


def mergeable_gaps(
    symbol: np.ndarray, need: np.ndarray, gap: np.ndarray, max_overfetch: float, overfetch_rows: float
) -> np.ndarray:
    """For blocks in time order (``symbol[b]``: non-decreasing codes that group them; ``need[b]``
    their rows, ``gap[b]`` the rows between block b and the next of its symbol), whether some run
    of blocks across the gap after block b could be within :func:`plan.within_bound`; False means
    the planner's partition cannot put blocks b and b+1 in one range (a symbol's last block: False).

    A run [i, j) fetches its blocks' rows N plus the gaps G between them, and ``within_bound``
    holds when G <= (max_overfetch - 1) N or G <= overfetch_rows (up to its 1e-9 tolerance):

    * the allowance: every run across gap b has G >= gap[b], so gap[b] alone decides;
    * the ratio: with prefix sums, G - (max_overfetch - 1) N = A[j] - B[i], so some run across
      gap b qualifies exactly when the smallest A[j] after it is within the largest B[i] before it.

    Runs longer than the planner looks (``MAX_RUN_BLOCKS``, its horizon) are counted too, and the
    tolerances are wide (one row plus 1e-6 of the symbol's rows): a gap marked mergeable may still
    not be merged, never the reverse (``test_plan_many`` checks this against ``partition``)."""
    n = len(need)
    if n == 0:
        return np.zeros(0, dtype=bool)
    symbol = np.asarray(symbol)
    first = np.r_[True, symbol[1:] != symbol[:-1]]
    last = np.r_[first[1:], True]
    starts = np.flatnonzero(first)
    seg = np.cumsum(first) - 1
    gap = np.where(last, 0.0, gap)
    r1 = max_overfetch - 1.0

    def before(v: np.ndarray) -> np.ndarray:  # sums over the symbol's earlier blocks
        c = np.cumsum(v) - v
        return c - c[starts][seg]

    pn, pg = before(need), before(gap)
    b = pg - r1 * pn  # B[b]: a run starting at block b
    a = pg - r1 * (pn + need)  # A[b + 1]: a run ending with block b
    best_b = _segmented(b, seg, np.maximum)
    best_a = _segmented(a[::-1], seg[::-1][0] - seg[::-1], np.minimum)[::-1]  # from block b on
    best_a = np.r_[best_a[1:], np.inf]  # from block b + 1 on (the last block's is unused)
    scale = (np.add.reduceat(need, starts) * max(1.0, r1) + np.add.reduceat(gap, starts))[seg]
    tol = 1.0 + 1e-6 * scale
    ratio = best_a - best_b <= tol
    allowance = gap <= overfetch_rows * (1 + 1e-6) + tol
    return ~last & (ratio | allowance)
