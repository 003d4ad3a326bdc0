"""The planner's arithmetic over arrays (``plan_many``) against the scalar planner: cumulative rows
bit for bit, and gaps ruled out only where ``within_bound`` admits no run across them."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import numpy as np

from smallcaps_ingest.core.cost import pages as _pages
from smallcaps_ingest.core.plan import (
    PAGE_ROWS,
    DensityStore,
    cumulative_rows,
    partition,
    within_bound,
)
from smallcaps_ingest.core.plan_many import cumulative_rows_many, mergeable_gaps

S = 1_000_000_000


def _ns(y: int, m: int, d: int, h: int = 0, mi: int = 0) -> int:
    return int(datetime(y, m, d, h, mi, tzinfo=UTC).timestamp()) * S


def test_cumulative_rows_many_equal_the_scalar_bit_for_bit() -> None:
    """Instants over DST switches (2024-03-10, 2024-11-03), a holiday (2024-07-04), weekends, every
    segment edge and between; two density sets (a learned one and the priors), each per instant."""
    rng = random.Random(7)
    edges = [_ns(2024, 3, 8, h, m) + day * 86_400 * S for day in range(4) for h in range(24) for m in (0, 30)]
    t = np.array(
        [rng.randrange(_ns(2024, 3, 1), _ns(2024, 3, 20)) for _ in range(3000)]
        + [rng.randrange(_ns(2024, 6, 28), _ns(2024, 7, 9)) for _ in range(2000)]
        + [rng.randrange(_ns(2024, 10, 30), _ns(2024, 11, 6)) for _ in range(2000)]
        + edges
        + [e - 1 for e in edges],
        dtype=np.int64,
    )
    store = DensityStore(None)
    store.observe("A", "trades", _ns(2024, 3, 5, 14, 30), _ns(2024, 3, 5, 16), 12_345)
    learned, prior = store.densities("A", "trades"), store.densities("B", "quotes")
    choose = np.array([rng.random() < 0.5 for _ in range(t.size)])
    per_instant = {s: np.where(choose, learned[s], prior[s]) for s in learned}
    got_mixed, got_prior = cumulative_rows_many(t, per_instant, prior)
    at_l, at_p = cumulative_rows(learned), cumulative_rows(prior)
    want_mixed = [at_l(x) if c else at_p(x) for x, c in zip(t.tolist(), choose.tolist(), strict=True)]
    assert got_mixed.tolist() == want_mixed  # exact floats, not approximately
    assert got_prior.tolist() == [at_p(x) for x in t.tolist()]
    by_symbol = {s: np.array([learned[s], prior[s]]) for s in learned}  # symbol 0 learned, 1 not
    (got_indexed,) = cumulative_rows_many(t, by_symbol, index=np.where(choose, 0, 1))
    assert got_indexed.tolist() == want_mixed


def _runs_cross(runs: list[tuple[int, int]], b: int) -> bool:
    return any(i <= b < j - 1 for i, j in runs)


def test_mergeable_gaps_never_rule_out_a_gap_the_planner_could_bridge() -> None:
    """Random blocks (rows 0 to a page, gaps 0 to two pages) of several symbols: every gap some run
    within ``within_bound`` crosses (brute force over all runs) is marked mergeable, so is every
    gap the optimal partition bridges; and the test is not vacuous (both kinds occur)."""
    rng = random.Random(3)
    marked = {True: 0, False: 0}
    for _ in range(400):
        sizes = [rng.randint(1, 9) for _ in range(rng.randint(1, 4))]
        symbol = np.repeat(np.arange(len(sizes)), sizes)
        need = np.array([rng.choice([0.0, 50.0, 900.0, 6_000.0, 20_000.0, PAGE_ROWS]) for _ in symbol])
        gap = np.array([rng.choice([0.0, 10.0, 3_000.0, 11_000.0, 40_000.0, 2 * PAGE_ROWS]) for _ in symbol])
        ratio, allowance = rng.choice([1.5, 2.0, 4.0]), rng.choice([0.0, 5_000.0, 11_111.0, PAGE_ROWS])
        got = mergeable_gaps(symbol, need, gap, ratio, allowance)
        for s, size in enumerate(sizes):
            b0 = int(np.searchsorted(symbol, s))
            nd, gp = need[b0 : b0 + size].tolist(), gap[b0 : b0 + size].tolist()
            edge = [0.0]
            for k in range(size):  # cumulative rows at each block's start and end
                edge += [edge[-1] + nd[k], edge[-1] + nd[k] + gp[k]]
            span = lambda i, j, e=edge: e[2 * j - 1] - e[2 * i]  # noqa: E731 - as plan_kind builds it
            runs = partition(nd, span, ratio, _pages, allowance)
            assert not got[b0 + size - 1]
            for b in range(size - 1):
                can = any(
                    within_bound(span(i, j), sum(nd[i:j]), ratio, allowance)
                    for i in range(b + 1)
                    for j in range(b + 2, size + 1)
                )
                assert got[b0 + b] or not can, (nd, gp, ratio, allowance, b)
                assert got[b0 + b] or not _runs_cross(runs, b)
                marked[bool(got[b0 + b])] += 1
    assert marked[True] > 100 and marked[False] > 100
