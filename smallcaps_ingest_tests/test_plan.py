"""Request planning: the optimal partition, the density model, exact ranges and exact request counts
over real HTTP against the simulator."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest

from smallcaps_ingest.fetch import FetchEngine, PolygonClient
from smallcaps_ingest.plan import (
    PRIOR_DENSITY,
    PRIOR_LEVEL_ROWS,
    PRIOR_SECONDS,
    DensityStore,
    Window,
    partition,
    plan_kind,
    plan_symbol,
)
from smallcaps_ingest.simulator import Simulator
from smallcaps_ingest_tests.conftest import ns

S = 1_000_000_000
MIN = 60 * S


def et(day: str, hhmm: str) -> int:
    """ns of an ET wall time on a March 2024 day before the DST switch (EST = UTC-5)."""
    h, m = map(int, hhmm.split(":"))
    return ns(f"{day}T00:00:00") + (5 * 60 + h * 60 + m) * MIN


def _brute_force(need: list[float], span: dict[tuple[int, int], float], bound: float) -> float:
    """Cheapest cost over every split of the blocks into contiguous runs (2^(n-1) of them)."""
    n = len(need)
    best = math.inf
    for cuts in itertools.product((False, True), repeat=n - 1):
        edges = [0] + [k + 1 for k, c in enumerate(cuts) if c] + [n]
        runs = list(itertools.pairwise(edges))
        if all(j - i == 1 or span[i, j] <= bound * sum(need[i:j]) for i, j in runs):
            best = min(best, sum(max(1, math.ceil(span[i, j] / 50_000)) for i, j in runs))
    return best


def test_partition_is_optimal() -> None:
    """The dynamic programme finds the cheapest bounded partition (checked against brute force)."""
    rng = random.Random(42)
    for _ in range(300):
        n = rng.randint(1, 7)
        need = [rng.choice((0, rng.uniform(0, 5_000), rng.uniform(5_000, 120_000))) for _ in range(n)]
        gaps = [rng.choice((0.0, rng.uniform(0, 20_000), rng.uniform(0, 200_000))) for _ in range(n - 1)]
        span = {}
        for i in range(n):
            for j in range(i + 1, n + 1):
                span[i, j] = sum(need[i:j]) + sum(gaps[i : j - 1])
        runs = partition(need, lambda i, j, s=span: s[i, j], 4.0, lambda r: max(1, math.ceil(r / 50_000)))
        assert [i for i, _ in runs] == sorted({i for i, _ in runs}) and runs[0][0] == 0 and runs[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
        assert all(j - i == 1 or span[i, j] <= 4.0 * sum(need[i:j]) * (1 + 1e-9) for i, j in runs)
        got = sum(max(1, math.ceil(span[i, j] / 50_000)) for i, j in runs)
        assert got == _brute_force(need, span, 4.0)


def test_partition_prefers_fewer_rows_at_equal_pages() -> None:
    # two 1-page blocks whose merge still needs 2 pages: kept apart (no rows fetched for nothing)
    runs = partition([30_000, 30_000], lambda i, j: 30_000 * (j - i) + 1_000 * (j - i - 1), 4.0,
                     lambda r: max(1, math.ceil(r / 50_000)))  # fmt: skip
    assert runs == [(0, 1), (1, 2)]


def _learned(symbol: str, kind: str, per_second: float) -> DensityStore:
    """A store that saw 5 h of RTH (10:00-15:00 ET) of ``symbol`` at ``per_second``."""
    store = DensityStore(None)
    a, b = et("2024-03-04", "10:00"), et("2024-03-04", "15:00")
    store.observe(symbol, kind, a, b, round(per_second * (b - a) / S))
    return store


def test_level_is_shared_across_segments_and_endpoints() -> None:
    store = _learned("DNS", "quotes", 100.0)  # 10x the RTH quotes prior
    secs = 5 * 3600
    level = (100.0 * secs + PRIOR_LEVEL_ROWS) / (PRIOR_DENSITY["quotes"]["RTH"] * secs + PRIOR_LEVEL_ROWS)
    assert store.level("DNS", "quotes") == pytest.approx(level) == pytest.approx(10.0, rel=1e-4)
    # RTH: what was seen (the base keeps 60 s of weight); PM, never seen: 10x its prior, not the prior
    rth = (100.0 * secs + PRIOR_SECONDS * 10.0 * level) / (secs + PRIOR_SECONDS)
    assert store.density("DNS", "quotes", "RTH") == pytest.approx(rth)
    assert store.density("DNS", "quotes", "PM") == pytest.approx(PRIOR_DENSITY["quotes"]["PM"] * level)
    # trades never fetched: planned at the quotes' level; an unknown symbol stays on the priors
    assert store.density("DNS", "trades", "OPEN") == pytest.approx(PRIOR_DENSITY["trades"]["OPEN"] * level)
    assert store.known("DNS") and not store.known("OTHER")
    assert store.level("OTHER", "trades") == 1.0
    assert store.density("OTHER", "trades", "AH") == PRIOR_DENSITY["trades"]["AH"]
    # a name seen with almost nothing is planned almost empty, everywhere
    sparse = _learned("THIN", "trades", 0.01)
    assert sparse.density("THIN", "trades", "OPEN") < 0.05 and sparse.density("THIN", "quotes", "RTH") < 0.2


def test_dense_blocks_stay_apart_while_sparse_ones_share_a_range() -> None:
    """100 quotes/s in RTH (so 10/s in PM): the PM windows share a range (1 page); the two RTH
    windows (60,000 rows = 2 pages each) stay apart, since together (30 min) they need 4 pages
    too, plus 60,000 rows for nothing. Trades (level 10: 20/s RTH, 2/s PM) fit one range each."""
    store = _learned("DNS", "quotes", 100.0)
    d = "2024-03-05"
    ws = [
        Window("pm1", et(d, "08:00"), et(d, "08:10")),
        Window("pm2", et(d, "08:30"), et(d, "08:40")),
        Window("r1", et(d, "11:00"), et(d, "11:10")),
        Window("r2", et(d, "11:20"), et(d, "11:30")),
        Window("next", et("2024-03-06", "08:05"), et("2024-03-06", "08:15")),  # next day: never merged
    ]
    quotes = plan_kind("DNS", "quotes", ws, store)
    assert [(r.start_ns, r.end_ns, [w.event_id for w in r.events]) for r in quotes] == [
        (et(d, "08:00"), et(d, "08:40"), ["pm1", "pm2"]),
        (et(d, "11:00"), et(d, "11:10"), ["r1"]),
        (et(d, "11:20"), et(d, "11:30"), ["r2"]),
        (ws[4].start_ns, ws[4].end_ns, ["next"]),
    ]
    trades = [(r.start_ns, r.end_ns) for r in plan_symbol("DNS", ws, store) if r.kind == "trades"]
    assert trades == [
        (et(d, "08:00"), et(d, "08:40")),
        (et(d, "11:00"), et(d, "11:30")),
        (ws[4].start_ns, ws[4].end_ns),
    ]


def test_warm_plan_makes_exact_requests_over_http(
    sim: Simulator, client: PolygonClient, tmp_path: Path
) -> None:
    """HVY (simulator liquidity 12: 18 quotes/s in PM, 120/s in RTH). Day one teaches the store;
    day two, warm, is planned as the floor: quotes 08:00-08:40 (43,207 rows, 1 page), 11:00-11:10
    and 11:20-11:30 apart (71,714 and 71,791 rows: 2 + 2 pages; merged, 215,803 rows = 5 pages);
    trades 08:00-08:40 (8,684 rows) and 11:00-11:30 (43,183 rows): 1 page each. 7 requests."""
    dens = DensityStore(tmp_path / "density.json")
    engine = FetchEngine(client, str(tmp_path / "data"), workers=4, density=dens)

    def day(d: str) -> list[Window]:
        spans = (("08:00", "08:10"), ("08:30", "08:40"), ("11:00", "11:10"), ("11:20", "11:30"))
        return [Window(f"{d}_{a[:2]}{a[3:]}", et(d, a), et(d, b)) for a, b in spans]

    (first,) = engine.run({"HVY": day("2024-03-05")})
    assert first.written == 4
    sim.reset_counters()
    (second,) = engine.run({"HVY": day("2024-03-06")})
    assert second.written == 4
    log = sim.request_log()
    assert second.stats.total_requests == len(log) == 7
    first_pages = sorted(
        (r.endpoint, r.gte_ns, r.lt_ns) for r in log if not r.cursor
    )  # one per range; the rest are follow-up pages
    d = "2024-03-06"
    assert first_pages == sorted(
        [
            ("quotes", et(d, "08:00"), et(d, "08:40")),
            ("quotes", et(d, "11:00"), et(d, "11:10")),
            ("quotes", et(d, "11:20"), et(d, "11:30")),
            ("trades", et(d, "08:00"), et(d, "08:40")),
            ("trades", et(d, "11:00"), et(d, "11:30")),
        ]
    )
    assert sum(r.rows for r in log) == 43_207 + 71_714 + 71_791 + 8_684 + 43_183
