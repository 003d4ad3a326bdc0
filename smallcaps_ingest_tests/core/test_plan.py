"""Request planning: the optimal partition, the density model, exact ranges and exact request counts
over real HTTP against the simulator."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from smallcaps_ingest.core.cost import PAGES_ONLY, MergeRule, TransferModel
from smallcaps_ingest.core.density import PRIOR_LEVEL_ROWS, PRIOR_SECONDS
from smallcaps_ingest.core.engine import FetchEngine
from smallcaps_ingest.core.plan import (
    PRIOR_DENSITY,
    DensityStore,
    Window,
    components,
    overfetch_allowance,
    partition,
    plan_kind,
    plan_symbol,
    session_segments,
    within_bound,
)
from smallcaps_ingest.core.polygon.client import PolygonClient
from smallcaps_ingest.simulator import Simulator
from smallcaps_ingest_tests.conftest import ns

S = 1_000_000_000
MIN = 60 * S


def et(day: str, hhmm: str) -> int:
    """ns of an ET wall time on a March 2024 day before the DST switch (EST = UTC-5)."""
    h, m = map(int, hhmm.split(":"))
    return ns(f"{day}T00:00:00") + (5 * 60 + h * 60 + m) * MIN


def _brute_force(
    need: list[float], span: dict[tuple[int, int], float], bound: float, allowance: float = 0.0
) -> float:
    """Cheapest cost over every split of the blocks into contiguous runs (2^(n-1) of them)."""
    n = len(need)
    best = math.inf
    for cuts in itertools.product((False, True), repeat=n - 1):
        edges = [0] + [k + 1 for k, c in enumerate(cuts) if c] + [n]
        runs = list(itertools.pairwise(edges))
        if all(j - i == 1 or within_bound(span[i, j], sum(need[i:j]), bound, allowance) for i, j in runs):
            best = min(best, sum(max(1, math.ceil(span[i, j] / 50_000)) for i, j in runs))
    return best


def test_partition_is_optimal() -> None:
    """The dynamic programme finds the cheapest bounded partition (checked against brute force),
    with and without an over-fetch allowance in rows."""
    rng = random.Random(42)
    for case in range(600):
        allowance = 0.0 if case % 2 else rng.choice((10_000.0, 50_000.0))
        n = rng.randint(1, 7)
        need = [rng.choice((0, rng.uniform(0, 5_000), rng.uniform(5_000, 120_000))) for _ in range(n)]
        gaps = [rng.choice((0.0, rng.uniform(0, 20_000), rng.uniform(0, 200_000))) for _ in range(n - 1)]
        span = {}
        for i in range(n):
            for j in range(i + 1, n + 1):
                span[i, j] = sum(need[i:j]) + sum(gaps[i : j - 1])
        runs = partition(
            need, lambda i, j, s=span: s[i, j], 4.0, lambda r: max(1, math.ceil(r / 50_000)), allowance
        )
        assert [i for i, _ in runs] == sorted({i for i, _ in runs}) and runs[0][0] == 0 and runs[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
        assert all(
            j - i == 1 or span[i, j] <= max(4.0 * sum(need[i:j]), sum(need[i:j]) + allowance) * (1 + 1e-9)
            for i, j in runs
        )
        got = sum(max(1, math.ceil(span[i, j] / 50_000)) for i, j in runs)
        assert got == _brute_force(need, span, 4.0, allowance)


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
        Window("next", et("2024-03-06", "08:05"), et("2024-03-06", "08:15")),  # next day: no allowance
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
    engine = FetchEngine(client, str(tmp_path / "data"), workers=4, density=dens, time_cost=False)

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


def test_overfetch_allowance_follows_the_budget() -> None:
    """The rows one request's share of the budget pays for in parse time, at most a page."""
    assert overfetch_allowance(5 / 60) == overfetch_allowance(10) == overfetch_allowance(20) == 50_000
    assert overfetch_allowance(90) == 11_111 and overfetch_allowance(500) == 2_000
    assert within_bound(40_000, 30_000, 4.0, 0) and not within_bound(130_000, 30_000, 4.0, 0)
    assert within_bound(20_000, 100, 4.0, 19_900) and not within_bound(20_001, 100, 4.0, 19_900)


def test_weekends_hold_no_session() -> None:
    """Friday 10:00 to Monday 10:00 holds the same sessions as Thursday 10:00 to Friday 10:00."""
    fri_mon = session_segments(et("2024-02-09", "10:00"), et("2024-02-12", "10:00"))
    thu_fri = session_segments(et("2024-02-08", "10:00"), et("2024-02-09", "10:00"))

    def by_session(segs: list[tuple[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, secs in segs:
            out[name] = out.get(name, 0.0) + secs
        return out

    a, b = by_session(fri_mon), by_session(thu_fri)
    assert a["OFF"] - b["OFF"] == 2 * 86_400  # Saturday and Sunday, plus the same two nights
    assert {k: v for k, v in a.items() if k != "OFF"} == {k: v for k, v in b.items() if k != "OFF"}


def test_sparse_name_merges_across_days_within_the_allowance() -> None:
    """A name at 0.05 trades/s and 0.25 quotes/s in RTH: a day of its quotes is ~7,600 rows, ~50x
    a ten-minute window, so no ratio merges days; an allowance of 25,000 rows puts a week's events
    (Thursday to the next Tuesday, over a weekend) in one range per endpoint; a dense name's stay
    apart, and with no allowance so do the sparse name's."""
    days = ("2024-02-08", "2024-02-09", "2024-02-12", "2024-02-13")
    ws = [Window(f"e{i}", et(d, "10:00"), et(d, "10:10")) for i, d in enumerate(days)]
    sparse = _learned("THIN", "quotes", 0.25)
    merged = plan_symbol("THIN", ws, sparse, overfetch_rows=25_000)
    assert [(r.kind, len(r.events)) for r in merged] == [("trades", 4), ("quotes", 4)]
    for r in merged:
        need = sum(sparse.expected_rows("THIN", r.kind, w.start_ns, w.end_ns) for w in ws)
        assert sparse.expected_rows("THIN", r.kind, r.start_ns, r.end_ns) <= need + 25_000
    assert len(plan_symbol("THIN", ws, sparse, overfetch_rows=0)) == 8
    # a tighter allowance: the quotes split where the rows run out, the trades (5x fewer) do not
    tight = plan_symbol("THIN", ws, sparse, overfetch_rows=8_000)
    assert [len(r.events) for r in tight if r.kind == "trades"] == [4]
    assert [len(r.events) for r in tight if r.kind == "quotes"] == [2, 2]  # one day's gap each
    dense = _learned("DNS", "quotes", 100.0)
    assert len(plan_symbol("DNS", ws, dense, overfetch_rows=50_000)) == 8


def test_components_cut_where_no_range_is_shared() -> None:
    """Groups of windows the engine can fetch and write on their own: a trades range across two
    days ties them together even where the quotes are apart."""
    sparse = _learned("THIN", "quotes", 0.25)
    d1, d2, d3 = "2024-03-05", "2024-03-06", "2024-03-20"
    ws = [
        Window("a", et(d1, "10:00"), et(d1, "10:10")),
        Window("b", et(d2, "10:00"), et(d2, "10:10")),
        Window("c", et(d3, "10:00"), et(d3, "10:10")),
    ]
    ranges = plan_symbol("THIN", ws, sparse, overfetch_rows=6_000)
    assert [(r.kind, [w.event_id for w in r.events]) for r in ranges] == [
        ("trades", ["a", "b"]),  # ~1,400 trades a day: one day's gap fits the allowance
        ("trades", ["c"]),  # two weeks do not
        ("quotes", ["a"]),
        ("quotes", ["b"]),
        ("quotes", ["c"]),
    ]
    groups = components(ws, ranges)
    assert [
        ([w.event_id for w in g], sorted((r.kind, r.events[0].event_id) for r in rs)) for g, rs in groups
    ] == [
        (["a", "b"], [("quotes", "a"), ("quotes", "b"), ("trades", "a")]),
        (["c"], [("quotes", "c"), ("trades", "c")]),
    ]


def test_cumulative_rows_equal_the_session_sums() -> None:
    """cumulative_rows (what plan_kind uses) gives the same expected rows as summing
    session_segments, across days, weekends and both DST switches."""
    from smallcaps_ingest.core.plan import cumulative_rows

    rng = random.Random(5)
    dens = {"PM": 0.7, "OPEN": 9.0, "RTH": 3.3, "CLOSE": 5.0, "AH": 0.4, "OFF": 0.0}
    at = cumulative_rows(dens)
    base = ns("2024-03-01T00:00:00")
    for _ in range(3000):
        a = base + rng.randrange(0, 300 * 86_400) * S
        b = a + rng.choice((rng.randrange(0, 900), rng.randrange(0, 12 * 86_400))) * S
        want = sum(dens[s] * secs for s, secs in session_segments(a, b))
        assert at(b) - at(a) == pytest.approx(want, rel=1e-9, abs=1e-6)


@pytest.mark.parametrize("with_flock", [True, False])
def test_density_saves_merge_with_or_without_flock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_flock: bool
) -> None:
    """Two stores (two processes) save into one file: their counts add up. Where the platform has
    no ``fcntl`` (Windows) the merge runs without the lock and gives the same file."""
    from smallcaps_ingest.core import density as plan_mod

    if not with_flock:
        monkeypatch.setattr(plan_mod, "fcntl", None)
    path = tmp_path / "state" / "density.json"
    start = et("2024-03-05", "10:00")
    a, b = DensityStore(path), DensityStore(path)
    a.observe("AAOI", "trades", start, start + 60 * 10**9, 600)
    b.observe("AAOI", "trades", start, start + 60 * 10**9, 300)
    a.save()
    b.save()
    assert json.loads(path.read_text()) == {"AAOI": {"trades": {"RTH": [900.0, 120.0]}}}
    assert DensityStore(path).known("AAOI")


def test_a_dense_names_events_hours_apart_stay_apart_when_the_page_would_idle_the_budget() -> None:
    """Two 10-minute RTH windows three hours apart. A dense name (4 trades/s) needs ~4,800 rows and
    one range over both holds ~45,600: one page instead of two, within the allowance. At 50 req/s
    and 12 workers a request may take 12 / 50 = 0.24 s for the budget to stay the bottleneck: on
    the prior (100 ms, 25 MB/s, 250 bytes a row) a page of at most 14,000 rows. So the dense
    name's windows are fetched apart while a sparse name's (0.05 trades/s: ~570 rows merged) still
    share a range; at 10 req/s a request may take 1.2 s, a full page fits, and the dense name's
    merge too (as without time in the cost)."""
    d = "2024-03-05"
    ws = [Window("a", et(d, "10:30"), et(d, "10:40")), Window("b", et(d, "13:30"), et(d, "13:40"))]
    model = TransferModel()
    fast, slow = model.rule("trades", 12, 50.0), model.rule("trades", 12, 10.0)
    assert fast.max_rows == pytest.approx(14_000) and slow.max_rows == math.inf

    def ranges(symbol: str, store: DensityStore, rule: MergeRule) -> list[list[str]]:
        return [[w.event_id for w in r.events]
                for r in plan_kind(symbol, "trades", ws, store, overfetch_rows=50_000, rule=rule)]

    dense, sparse = _learned("DNS", "trades", 4.0), _learned("THIN", "trades", 0.05)
    span = dense.expected_rows("DNS", "trades", ws[0].start_ns, ws[1].end_ns)
    assert span == pytest.approx(45_600, rel=0.01)
    assert ranges("DNS", dense, PAGES_ONLY) == [["a", "b"]]
    assert ranges("DNS", dense, fast) == [["a"], ["b"]]
    assert ranges("DNS", dense, slow) == [["a", "b"]]
    assert ranges("THIN", sparse, fast) == [["a", "b"]]
    # plan_symbol and plan_groups take the rule per endpoint
    assert len(plan_symbol("DNS", ws, dense, overfetch_rows=50_000, kinds=("trades",),
                           merge_rule=lambda kind: model.rule(kind, 12, 50.0))) == 2


def test_with_too_few_workers_for_the_budget_a_merge_must_save_worker_time() -> None:
    """4 workers at 500 req/s: the prior's 100 ms latency alone exceeds 4 / 500 s, so the workers
    are the bottleneck whatever is planned, and a range costs its seconds (0.1 s a page, 10 us a
    row): two 1,000-row blocks merge across a 5,000-row gap (0.17 s against 0.22 s) and stay
    apart across a 20,000-row one (0.32 s)."""
    rule = TransferModel().rule("trades", 4, 500.0)
    assert rule.max_rows == math.inf and rule.cost(50_000) == pytest.approx(0.6)
    for gap, runs in ((5_000, [(0, 2)]), (20_000, [(0, 1), (1, 2)])):
        got = partition([1_000, 1_000], lambda i, j, g=gap: 1_000 * (j - i) + g * (j - i - 1), 100.0,
                        rule.cost, 50_000, max_rows=rule.max_rows)
        assert got == runs


def test_transfer_model_learns_latency_throughput_and_bytes_per_row() -> None:
    """Responses at 50 ms + bytes / 5 MB/s, 300 bytes a row: the fitted line and bytes per row
    follow them (the prior keeps four responses' weight: within 10 %). The rule with them, at 20 req/s and
    12 workers: those pages took 1.55 s on average, far more than the 12 / 20 = 0.6 s that keep the
    budget the bottleneck; the rule never allows less than a page of 0.6 s:
    (0.6 - 0.05) s / (300 / 5e6 s a row) = 9,167 rows (the next test: more when they take less)."""
    m = TransferModel()
    assert m.line() == pytest.approx((0.1, 1 / 25e6)) and m.bytes_per_row("quotes") == 250
    for i in range(2_000):
        rows = (i % 11) * 5_000
        m.observe("trades", rows, rows * 300, 0.05 + rows * 300 / 5e6)
    latency, per_byte = m.line()
    assert latency == pytest.approx(0.05, rel=0.1) and per_byte == pytest.approx(1 / 5e6, rel=0.1)
    assert m.bytes_per_row("trades") == pytest.approx(300, rel=0.01) and m.bytes_per_row("quotes") == 250
    assert m.mean_seconds(0.51) == pytest.approx(1.55, rel=0.1)
    assert m.rule("trades", 12, 20.0).max_rows == pytest.approx(9_167, rel=0.1)


def test_the_rule_follows_the_mean_page_time_so_big_pages_among_small_ones_still_merge() -> None:
    """The dense name of the test above, at 50 req/s and 12 workers, where the pages must take
    0.24 s on average for the budget to stay the bottleneck (the rule aims at 0.85 of it, 0.204 s).
    Taught by pages on the prior's line (100 ms + 10 us a row), shrunk towards the aim by ten
    responses' weight: after 400-row pages (0.104 s; mean 0.113 s) a page may take
    0.24 + 4 x (0.204 - 0.113) s, more than a full one's 0.6 s, so the two windows merge into one
    ~45,600-row page; after 12,000-row pages (0.22 s, slower than the aim) a page may take 0.24 s
    as on the prior, 14,000 rows, never less: the dense name's windows stay apart, the sparse
    name's ~570 rows merge."""
    d = "2024-03-05"
    ws = [Window("a", et(d, "10:30"), et(d, "10:40")), Window("b", et(d, "13:30"), et(d, "13:40"))]
    dense, sparse = _learned("DNS", "trades", 4.0), _learned("THIN", "trades", 0.05)

    def taught(rows: int) -> MergeRule:
        m = TransferModel()
        for _ in range(1_000):
            m.observe("trades", rows, rows * 250, 0.1 + rows * 250 / 25e6)
        return m.rule("trades", 12, 50.0)

    def ranges(symbol: str, store: DensityStore, rule: MergeRule) -> list[list[str]]:
        return [[w.event_id for w in r.events]
                for r in plan_kind(symbol, "trades", ws, store, overfetch_rows=50_000, rule=rule)]

    small, slow = taught(400), taught(12_000)
    assert small.max_rows == math.inf
    assert slow.max_rows == pytest.approx(14_000) == TransferModel().rule("trades", 12, 50.0).max_rows
    assert ranges("DNS", dense, small) == [["a", "b"]]
    assert ranges("DNS", dense, slow) == [["a"], ["b"]]
    assert ranges("THIN", sparse, slow) == [["a", "b"]]
