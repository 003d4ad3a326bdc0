"""Shaping (quote grid semantics on hand-built quotes), request planning and the budget."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from smallcaps_ingest.core import shape
from smallcaps_ingest.core.density import ET, SESSION_BOUNDS
from smallcaps_ingest.core.plan import (
    NS,
    DensityStore,
    Window,
    plan_kind,
    plan_symbol,
    session_segments,
)
from smallcaps_ingest.core.polygon.budget import RequestBudget
from smallcaps_ingest.core.trading_calendar import is_trading_day
from smallcaps_ingest_tests.conftest import REPO, ns

S = 1_000_000_000
MIN = 60 * S


def _quotes(rows: list[tuple[int, int, float, float]]) -> pl.DataFrame:
    """(sip_ns, seq, bid, ask) -> a raw quotes frame."""
    df = pl.DataFrame(
        {
            "sip_timestamp": [r[0] for r in rows],
            "sequence_number": [r[1] for r in rows],
            "bid_price": [r[2] for r in rows],
            "ask_price": [r[3] for r in rows],
            "bid_size": [100.0] * len(rows),
            "ask_size": [200.0] * len(rows),
            "bid_exchange": [11] * len(rows),
            "ask_exchange": [12] * len(rows),
        }
    )
    return df.select(
        (pl.col(c) if c in df.columns else pl.lit(None)).cast(t).alias(c)
        for c, t in shape.RAW_QUOTES_SCHEMA.items()
    )


def test_quote_grid_semantics() -> None:
    t0 = 1_000 * S
    raw = _quotes(
        [
            (t0 - 1, 1, 9.0, 9.5),  # before the window: never used (no look-back)
            (t0 + 1_500_000_000, 2, 10.0, 10.1),  # bucket 1 (1.5 s)
            (t0 + 2_000_000_000, 3, 10.2, 10.3),  # exactly on the edge of bucket 1/2: belongs to bucket 2
            (t0 + 2_100_000_000, 4, 10.4, 10.5),  # bucket 2
            (t0 + 5_999_999_999, 5, 11.0, 11.1),  # last ns of bucket 5
            (t0 + 6_000_000_000, 6, 12.0, 12.1),  # at the window end: outside
        ]
    )
    out = shape.shape_quotes(raw, t0, t0 + 6 * S, hz=1.0)
    assert out.schema == pl.Schema(shape.QUOTES_SCHEMA)
    # bucket 0 [0,1s) has no quote before its right edge -> left out; buckets 1..5 present
    assert out["ts"].dt.epoch("ns").to_list() == [t0 + k * S for k in (2, 3, 4, 5, 6)]
    # NBBO as known at ts: the last quote strictly before ts (the 2.0 s quote is NOT known at ts=2.0 s)
    assert out["sequence_number"].to_list() == [2, 4, 4, 4, 5]
    assert out["bid_price"].to_list() == [10.0, 10.4, 10.4, 10.4, 11.0]
    assert out["sip_timestamp"].dt.epoch("ns").to_list()[0] == t0 + 1_500_000_000
    # raw quotes inside each bucket [left, right)
    assert out["quote_count"].to_list() == [1, 2, 0, 0, 1]


def test_quote_grid_partial_last_bucket_and_raw_mode() -> None:
    t0 = 0
    raw = _quotes([(100, 1, 1.0, 2.0), (2_600_000_000, 2, 1.5, 2.5)])
    out = shape.shape_quotes(raw, t0, 2_500_000_000 + 200_000_000, hz=1.0)  # 2.7 s window
    assert out["ts"].dt.epoch("ns").to_list() == [S, 2 * S, 2_700_000_000]
    assert out["quote_count"].to_list() == [1, 0, 1]
    assert out["sequence_number"].to_list() == [1, 1, 2]  # the 2.6 s quote is known at ts=2.7 s
    two_hz = shape.shape_quotes(raw, 0, S, hz=2.0)
    assert two_hz["ts"].dt.epoch("ns").to_list() == [S // 2, S]
    rawmode = shape.shape_quotes(raw, 0, 10 * S, hz=0)
    assert rawmode.height == 2 and rawmode.schema == pl.Schema(shape.RAW_QUOTES_OUT_SCHEMA)
    empty = shape.shape_quotes(shape.empty_raw("quotes"), 0, 600 * S, hz=1.0)
    assert empty.height == 0 and empty.schema == pl.Schema(shape.QUOTES_SCHEMA)


def test_trades_window_and_order() -> None:
    raw = pl.DataFrame(
        {"sip_timestamp": [5, 1, 3, 3, 10], "sequence_number": [5, 1, 4, 3, 9], "price": [1.0] * 5},
    ).with_columns(pl.col("sip_timestamp", "sequence_number").cast(pl.Int64))
    for col, dtype in shape.RAW_TRADES_SCHEMA.items():
        if col not in raw.columns:
            raw = raw.with_columns(pl.lit(None, dtype).alias(col))
    out = shape.shape_trades(raw, 1, 10)
    assert out["sequence_number"].to_list() == [1, 3, 4, 5]  # [1, 10), sorted by (ts, seq)
    assert out.schema == pl.Schema(shape.TRADES_SCHEMA)


def _reference_raw(
    raw: pl.DataFrame, start_ns: int, end_ns: int, schema: dict[str, pl.DataType]
) -> pl.DataFrame:
    """The plain polars statement of the raw contract (trades, quotes at hz 0): filter, sort, cast."""
    inside = raw.filter((pl.col("sip_timestamp") >= start_ns) & (pl.col("sip_timestamp") < end_ns))
    inside = inside.sort("sip_timestamp", "sequence_number")
    return inside.select(pl.col(c).cast(t) for c, t in schema.items())


def _reference_quotes(raw: pl.DataFrame, start_ns: int, end_ns: int, hz: float) -> pl.DataFrame:
    """The 1 Hz grid as polars' as-of join + group-by (shape.py used it until its fixed costs were
    measured): the oracle for shape_quotes' binary searches."""
    inside = raw.lazy().filter((pl.col("sip_timestamp") >= start_ns) & (pl.col("sip_timestamp") < end_ns))
    inside = inside.sort("sip_timestamp", "sequence_number")
    width = round(S / hz)
    buckets = -(-(end_ns - start_ns) // width)
    grid = pl.LazyFrame({"bucket": pl.int_range(0, buckets, dtype=pl.Int64, eager=True)}).with_columns(
        ts=pl.min_horizontal(pl.lit(start_ns) + (pl.col("bucket") + 1) * width, pl.lit(end_ns))
    )
    counts = inside.group_by(bucket=(pl.col("sip_timestamp") - start_ns) // width).agg(
        quote_count=pl.len().cast(pl.UInt32)
    )
    known = inside.select("sip_timestamp", "sequence_number", *shape.QUOTE_FIELDS)
    out = (
        grid.join_asof(known, left_on="ts", right_on="sip_timestamp", strategy="backward",
                       allow_exact_matches=False, check_sortedness=False)
        .filter(pl.col("sip_timestamp").is_not_null())
        .join(counts, on="bucket", how="left")
        .with_columns(pl.col("quote_count").fill_null(0))
    )
    return out.select(pl.col(c).cast(t) for c, t in shape.QUOTES_SCHEMA.items()).collect()


@pytest.mark.parametrize("seed", range(40))
def test_shaping_matches_the_polars_join_oracle(seed: int) -> None:
    """Random raw frames (ties, shuffled pages, rows outside the window, quiet stretches, partial
    last buckets, several rates) shape exactly as the filter/sort/as-of-join statement does."""
    rng = random.Random(seed)
    start = 1_700_000_000 * S + rng.randrange(S)
    end = start + rng.choice([S // 3, 7 * S + 123, 60 * S, 600 * S + 1])
    n = rng.choice([0, 1, 5, 300, 3000])
    lo, hi = start - 5 * S, end + 5 * S
    quiet = (start + (end - start) // 3, start + (end - start) // 2)
    ts = [t for t in sorted(rng.randrange(lo, hi) for _ in range(n)) if not quiet[0] <= t < quiet[1]]
    ts += [t for t in ts[: n // 10]]  # equal timestamps: the sequence number decides
    ts += [start, end - 1, end]  # exactly on the edges
    ts.sort()
    rows = [(t, i + 1, 10.0 + i / 100, 10.01 + i / 100) for i, t in enumerate(ts)]
    if seed % 2:
        rng.shuffle(rows)  # out of order: sorted first
    raw = _quotes(rows)
    hz = rng.choice([1.0, 2.0, 0.1, 1 / 7, 3.0])
    assert shape.shape_quotes(raw, start, end, hz).equals(_reference_quotes(raw, start, end, hz))
    assert shape.shape_quotes(raw, start, end, 0).equals(
        _reference_raw(raw, start, end, shape.RAW_QUOTES_OUT_SCHEMA)
    )
    trades = raw.select(pl.col("sip_timestamp", "sequence_number")).with_columns(
        (pl.lit(None).cast(t).alias(c) for c, t in shape.RAW_TRADES_SCHEMA.items()
         if c not in ("sip_timestamp", "sequence_number"))
    ).select(*shape.RAW_TRADES_SCHEMA)
    want = _reference_raw(trades, start, end, shape.TRADES_SCHEMA)
    assert shape.shape_trades(trades, start, end).equals(want)


def test_session_segments_split_at_boundaries() -> None:
    # 2024-03-05 09:20 -> 09:40 ET (14:20 -> 14:40 UTC, EST)
    segs = session_segments(ns("2024-03-05T14:20:00"), ns("2024-03-05T14:40:00"))
    assert segs == [("PM", 600.0), ("OPEN", 600.0)]
    # DST: 2024-03-11 09:30 ET is 13:30 UTC
    segs = session_segments(ns("2024-03-11T13:25:00"), ns("2024-03-11T13:35:00"))
    assert segs == [("PM", 300.0), ("OPEN", 300.0)]
    segs = session_segments(ns("2024-03-05T14:55:00"), ns("2024-03-05T21:05:00"))  # 09:55 -> 16:05 ET
    assert segs == [("OPEN", 300.0), ("RTH", 19800.0), ("CLOSE", 1800.0), ("AH", 300.0)]


def _segments_through_the_zone(start_ns: int, end_ns: int) -> list[tuple[str, float]]:
    """The former ``session_segments`` (every edge resolved through the zone): the oracle."""
    out: list[tuple[str, float]] = []
    cur = start_ns
    while cur < end_ns:
        local = datetime.fromtimestamp(cur / NS, UTC).astimezone(ET)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        session, boundary, prev = "OFF", None, 0
        if not is_trading_day(local.date()):  # weekends and NYSE holidays hold no session
            nxt = min(end_ns, int((midnight + timedelta(days=1)).astimezone(UTC).timestamp()) * NS)
            out.append(("OFF", (nxt - cur) / NS))
            cur = nxt
            continue
        for hour, minute, name in SESSION_BOUNDS:
            b = hour * 60 + minute
            minute_of_day = local.hour * 60 + local.minute + local.second / 60 + local.microsecond / 6e7
            if prev <= minute_of_day < b:
                session = name
                edge = (midnight + timedelta(minutes=b)) if b < 24 * 60 else (midnight + timedelta(days=1))
                boundary = int(edge.astimezone(UTC).timestamp()) * NS
                break
            prev = b
        nxt = min(end_ns, boundary if boundary and boundary > cur else end_ns)
        out.append((session, (nxt - cur) / NS))
        cur = nxt
    return out


def test_session_segments_match_the_zone_oracle_across_dst_and_weekends() -> None:
    rng = random.Random(5)
    anchors = [ns(t) for t in ("2024-03-08T05:00:00", "2024-03-10T06:59:59", "2024-11-01T13:30:00",
                               "2024-11-03T05:00:00", "2023-12-29T21:00:00", "2025-06-06T08:00:00")]
    spans = [1, 59, 1800, 3600 * 6, 86_400, 86_400 * 3, 86_400 * 9]
    cases = 0
    for anchor in anchors:
        for _ in range(120):
            offset = rng.choice((0, 1, rng.randrange(NS)))
            start = anchor + rng.randrange(-3 * 86_400, 3 * 86_400) * NS + offset
            end = start + rng.choice(spans) * NS + rng.randrange(NS)
            assert session_segments(start, end) == _segments_through_the_zone(start, end), (start, end)
            cases += 1
    # exactly on edges (midnights around DST, the open, the close), and a nanosecond before them:
    # that nanosecond is the previous segment's (the oracle's float cannot tell it apart)
    for t, before in (("2024-03-11T04:00:00", "OFF"), ("2024-03-11T13:30:00", "PM"),
                      ("2024-11-04T05:00:00", "OFF"), ("2024-03-08T21:00:00", "CLOSE")):
        start = ns(t)
        for end in (start + 1, start + 86_400 * NS, start + 86_400 * 2 * NS + 1):
            want = _segments_through_the_zone(start, end)
            assert session_segments(start, end) == want, (t, end)
            assert session_segments(start - 1, end) == [(before, 1e-9), *want], (t, end)
    assert cases == 720
    # a DST day is 23 or 25 hours, and its segments add up to the range
    spring = session_segments(ns("2024-03-10T05:00:00"), ns("2024-03-11T04:00:00"))  # Sunday, 23 h
    assert spring == [("OFF", 23 * 3600.0)]
    autumn = session_segments(ns("2024-11-04T05:00:00"), ns("2024-11-05T05:00:00"))  # Monday after
    assert sum(sec for _, sec in autumn) == 86_400.0 and [s for s, _ in autumn][:3] == ["OFF", "PM", "OPEN"]


def _w(i: int, start: int, minutes: int = 10) -> Window:
    return Window(f"e{i}", start, start + minutes * MIN)


def test_plan_merges_overlaps_always_and_gaps_when_cheap(tmp_path: Path) -> None:
    day = ns("2024-03-05T15:00:00")
    dens = DensityStore(None)
    # overlapping + adjacent: one range, exactly the union (no over-fetch)
    ranges = plan_kind("AAOI", "trades", [_w(0, day), _w(1, day + 5 * MIN), _w(2, day + 15 * MIN)], dens)
    assert [(r.start_ns, r.end_ns) for r in ranges] == [(day, day + 25 * MIN)]
    assert sorted(w.event_id for w in ranges[0].events) == ["e0", "e1", "e2"]
    # a gap on the same day: merged while it saves pages and stays within 4x the needed rows
    near = plan_kind("AAOI", "trades", [_w(0, day), _w(1, day + 30 * MIN)], dens)
    assert len(near) == 1
    far = plan_kind("AAOI", "trades", [_w(0, day), _w(1, day + 80 * MIN)], dens)  # 90 min > 4 x 20 min
    assert len(far) == 2
    # never across days
    nxt = plan_kind("AAOI", "trades", [_w(0, day), _w(1, day + 24 * 60 * MIN)], dens, max_overfetch=1e9)
    assert len(nxt) == 2


def test_plan_keeps_dense_names_one_range_per_event() -> None:
    dens = DensityStore(None)
    day = ns("2024-03-05T15:00:00")
    # learn a dense quotes name: 150 quotes/s in RTH -> 90,000 rows per 10-minute window
    dens.observe("HVY", "quotes", day, day + 10 * MIN, 90_000)
    ws = [_w(0, day), _w(1, day + 40 * MIN)]
    assert len(plan_kind("HVY", "quotes", ws, dens)) == 2  # merging would not save a page
    sparse = DensityStore(None)
    sparse.observe("XELB", "quotes", day, day + 10 * MIN, 30)
    spread = [_w(i, day + i * 25 * MIN) for i in range(5)]
    ranges = plan_symbol("XELB", spread, sparse)
    assert len([r for r in ranges if r.kind == "quotes"]) == 1


def test_density_store_merges_concurrent_saves(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    a, b = DensityStore(p), DensityStore(p)
    day = ns("2024-03-05T15:00:00")
    a.observe("AAOI", "trades", day, day + MIN, 60)
    b.observe("AAOI", "trades", day, day + MIN, 120)
    a.save()
    b.save()
    merged = DensityStore(p)
    assert merged._obs["AAOI"]["trades"]["RTH"] == [180.0, 120.0]
    # 180 rows in 120 s, shrunk (PRIOR_SECONDS = 60) towards the RTH prior (2.0/s) scaled by the
    # symbol's level: observed / prior-expected rows, (180 + 10) / (240 + 10) with PRIOR_LEVEL_ROWS 10
    assert merged.density("AAOI", "trades", "RTH") == pytest.approx(
        (180 + 2.0 * (190 / 250) * 60) / (120 + 60)
    )


def test_budget_limits_threads_in_any_window(tmp_path: Path) -> None:
    b = RequestBudget(25, tmp_path / "b.sqlite")
    stamps: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            b.acquire()
            b.mark_sent()  # what the HTTP connection does once the request bytes are written
            with lock:
                stamps.append(time.time())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stamps.sort()
    assert len(stamps) == 80
    worst = max(sum(1 for s in stamps if t <= s < t + 1.0) for t in stamps)
    assert worst <= 25
    assert stamps[-1] - stamps[0] >= (80 - 25) / 25 * 0.99


def test_budget_aimd_cuts_and_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = RequestBudget(100, tmp_path / "b.sqlite")
    assert b.effective_rps == 100
    assert b.on_throttled() == pytest.approx(80, rel=0.01)
    assert b.on_throttled() == pytest.approx(80, rel=0.01)  # one cut per burst of in-flight 429s
    other = RequestBudget(100, tmp_path / "b.sqlite")  # another process sees the cut rate
    assert other.effective_rps < 82
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 5)  # 5 s later: +2 %/s of the budget
    assert b.effective_rps == pytest.approx(90, abs=1)
    monkeypatch.setattr(time, "time", lambda: real() + 11)
    assert b.effective_rps == 100


def test_budget_rejects_bad_rate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="POLYGON_MAX_RPS"):
        RequestBudget(0, tmp_path / "b.sqlite")
    slow = RequestBudget(0.5, tmp_path / "s.sqlite")  # below one per second: 1 per 2 s
    assert slow.try_acquire() == 0.0
    slow.mark_sent()
    assert 1.9 < slow.try_acquire() <= 2.05


def test_budget_counts_a_grant_until_its_request_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A granted request held up before the send (GIL, connection) never leaves the window early."""
    b = RequestBudget(2, tmp_path / "b.sqlite")
    real = time.time
    at = lambda s: monkeypatch.setattr(time, "time", lambda: real() + s)  # noqa: E731
    assert b.try_acquire() == 0.0  # grant 1: its request never reports being sent (say it died)
    at(3)
    assert b.try_acquire() == 0.0  # grant 2: 3 s later grant 1 still counts, one slot is left
    assert 0 < b.try_acquire() <= 0.002  # both unsent: full, poll until a send is reported
    b.mark_sent()  # grant 2 went on the wire at +3 s: it counts one window from then
    assert 0.99 < b.try_acquire() <= 1.03
    at(4.5)
    assert b.try_acquire() == 0.0  # grant 2 aged out; grant 1 (never sent) still counts
    assert 0 < b.try_acquire() <= 0.002
    at(6.1)  # past grant 1's lease (5 s) plus one window: it no longer blocks anyone
    assert b.try_acquire() == 0.0


def test_processes_opening_a_fresh_budget_file_at_once_all_start(tmp_path: Path) -> None:
    """Steps and runs that start together open the same new budget file at the same moment:
    each must wait for the file, never fail with "database is locked"."""
    for trial in range(6):
        path = tmp_path / f"budget{trial}.sqlite"
        start = time.time() + 1.0
        code = textwrap.dedent(f"""
            import time
            from smallcaps_ingest.core.polygon.budget import RequestBudget
            time.sleep(max(0.0, {start} - time.time()))
            assert RequestBudget(20, {str(path)!r}).try_acquire() == 0.0
        """)
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)
                 for _ in range(8)]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, (trial, [e for e in errors if e][:1])
