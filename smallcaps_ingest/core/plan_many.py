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

from smallcaps_ingest.core.plan import NS, SESSION_BOUNDS, _hour_day

_HOUR_NS = 3600 * NS
# the segments of a trading day, from midnight (the names _hour_day gives a trading day)
DAY_SEGMENTS = tuple(name for _, _, name in SESSION_BOUNDS)


class DayTable:
    """The ET days holding a set of instants, as arrays: each day's segment edges (ns, midnight
    first; a closed day's one OFF segment is padded with its end), trading days before it, and
    whether it is one; built from :func:`plan._hour_day` once per day (not per instant)."""

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
    t_ns: np.ndarray, dens: Mapping[str, np.ndarray], table: DayTable | None = None
) -> np.ndarray:
    """``cumulative_rows(d)(t)`` for every instant ``t_ns[i]`` at densities ``dens[s][i]`` (an
    array per session segment, one value per instant), bit for bit."""
    t = np.asarray(t_ns, dtype=np.int64)
    if t.size == 0:
        return np.zeros(0)
    if np.any(dens.get("OFF", 0.0)):
        raise ValueError("cumulative_rows assumes no ticks outside the sessions")
    table = table or DayTable(t)
    d = table.day_of(t)
    rows = day_rows(dens) * table.days_before[d]
    active = table.trading[d]
    for k, name in enumerate(DAY_SEGMENTS):
        start, end = table.edges[d, k], table.edges[d, k + 1]
        full = t >= end
        rows = np.where(
            active & full,
            rows + dens[name] * (end - start) / NS,
            np.where(active, rows + dens[name] * (t - start) / NS, rows),
        )
        active = active & full
    return rows


def mergeable_gaps(
    symbol: np.ndarray, need: np.ndarray, gap: np.ndarray, max_overfetch: float, overfetch_rows: float
) -> np.ndarray:
    """For blocks in time order (``symbol[b]`` groups them; ``need[b]`` their rows, ``gap[b]`` the
    rows between block b and the next of its symbol), whether some run of blocks across the gap
    after block b could be within :func:`plan.within_bound`; False means the planner's partition
    cannot put blocks b and b+1 in one range (and the last block of a symbol is False).

    A run [i, j) fetches its blocks' rows N plus the gaps G between them, and ``within_bound``
    holds when G <= (max_overfetch - 1) N or G <= overfetch_rows (up to its 1e-9 tolerance):

    * the allowance: every run across gap b has G >= gap[b], so gap[b] alone decides;
    * the ratio: with prefix sums, G - (max_overfetch - 1) N = A[j] - B[i], so some run across
      gap b qualifies exactly when the smallest A[j] after it is within the largest B[i] before it.

    Runs longer than the planner looks (``MAX_RUN_BLOCKS``, its horizon) are counted too, and the
    tolerances are wide (one row plus 1e-6 of the sums): a gap marked mergeable may still not be
    merged, never the reverse (``test_plan_many`` checks this against ``partition``)."""
    n = len(need)
    if n == 0:
        return np.zeros(0, dtype=bool)
    symbol = np.asarray(symbol)
    last = np.r_[symbol[1:] != symbol[:-1], True]
    gap = np.where(last, 0.0, gap)
    r1 = max_overfetch - 1.0
    frame = pl.DataFrame({"s": symbol, "need": need, "gap": gap}).with_columns(
        pn=pl.col("need").cum_sum().over("s") - pl.col("need"),  # need before block b
        pg=pl.col("gap").cum_sum().over("s") - pl.col("gap"),  # gaps before block b
    )
    frame = frame.with_columns(
        b=pl.col("pg") - r1 * pl.col("pn"),  # B[b]: a run starting at block b
        a=pl.col("pg") - r1 * (pl.col("pn") + pl.col("need")),  # A[b+1]: a run ending with block b
        scale=pl.col("need").sum().over("s") * max(1.0, r1) + pl.col("gap").sum().over("s"),
    ).with_columns(
        best_b=pl.col("b").cum_max().over("s"),
        best_a=pl.col("a").reverse().cum_min().reverse().over("s").shift(-1),
    )
    tol = 1.0 + 1e-6 * frame["scale"].to_numpy()
    ratio = (frame["best_a"] - frame["best_b"]).fill_null(np.inf).to_numpy() <= tol
    allowance = gap <= overfetch_rows * (1 + 1e-6) + tol
    return ~last & (ratio | allowance)
