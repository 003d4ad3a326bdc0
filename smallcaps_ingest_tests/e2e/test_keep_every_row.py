"""Every row the API returns is kept: sequence numbers restart every trading day and repeat
within a day, so nothing is ever de-duplicated on them (issue 16, part 1).

Real HTTP against the bundled simulator; exact against its ground truth.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from smallcaps_ingest.core import check, shape, store
from smallcaps_ingest.core.engine import FetchEngine
from smallcaps_ingest.core.plan import DensityStore, Window
from smallcaps_ingest.core.polygon.client import PolygonClient
from smallcaps_ingest.core.polygon.stats import FetchStats
from smallcaps_ingest.simulator import Simulator
from smallcaps_ingest_tests.conftest import ns, truth_frame

DAY_NS = 86_400 * 1_000_000_000
# eight consecutive trading days (no holiday among them)
DAYS = ("2024-02-06", "2024-02-07", "2024-02-08", "2024-02-09",
        "2024-02-12", "2024-02-13", "2024-02-14", "2024-02-15")


def _per_day(frame: pl.DataFrame) -> list[int]:
    """Rows per ET day, in time order."""
    day = pl.from_epoch("sip_timestamp", "ns").dt.replace_time_zone("UTC").dt.convert_time_zone(
        "America/New_York"
    ).dt.date()
    return frame.group_by(day.alias("d")).len().sort("d")["len"].to_list()


def test_a_multi_day_range_with_seams_after_each_day_keeps_every_row(
    sim: Simulator, client: PolygonClient
) -> None:
    """A range over four trading days of a sparse name, with pages capped at 2,000 rows (below
    the 50,000 asked for) that end after each day's last row: each day's numbers are mostly the
    previous day's again, right across the seam. The frame is the ground truth, row for row."""
    sim.config.page_cap = 2_000
    sim.config.page_ends_at_day = True
    lo, hi = ns("2024-02-06T15:00:00"), ns("2024-02-09T15:10:00")
    for kind in ("trades", "quotes"):
        stats = FetchStats()
        got = client.fetch_range(kind, "XELB", lo, hi, stats)
        want = truth_frame(kind, "XELB", lo, hi)
        days = _per_day(want)
        assert len(days) == 4 and want["sequence_number"].n_unique() < want.height  # numbers repeat
        assert got.height == want.height and got.equals(want), kind
        assert stats.pages == sum(-(-n // 2_000) for n in days), kind  # the seams fall at the days' ends
        assert stats.rows_raw == want.height


def _taught_engine(client: PolygonClient, tmp_path: Path) -> tuple[Path, FetchEngine]:
    """An engine that knows XELB's level (taught on a day before) and may fetch 50,000 rows
    beyond what a range's events need, which merges the sparse name's events across days."""
    dens = tmp_path / "dens.json"
    teach = FetchEngine(client, str(tmp_path / "t"), workers=4, density=DensityStore(dens), overfetch_rows=0)
    (t,) = teach.run({"XELB": [Window("teach", ns("2024-02-05T15:00:00"), ns("2024-02-05T16:00:00"))]})
    assert t.error is None and t.written == 1
    data = tmp_path / "d"
    # the page planner: 4 workers cannot keep the fixture's 500 req/s busy, so time would split days
    return data, FetchEngine(client, str(data), workers=4, density=DensityStore(dens), overfetch_rows=50_000,
                             time_cost=False)


def test_events_on_eight_days_merged_across_days_are_exact(
    sim: Simulator, client: PolygonClient, tmp_path: Path
) -> None:
    """A sparse name's events twice a day on eight consecutive trading days, through the engine:
    the planner merges them into ranges spanning days, and 5,000-row pages put seams inside
    ranges that span days (a trades page holds ~4 days, a quotes page most of one), where the
    same numbers recur. Every event's trades and quotes are exactly the ground truth."""
    windows = [
        Window(f"x{i}_{h}", ns(f"{d}T{h}:00:00"), ns(f"{d}T{h}:10:00"))
        for i, d in enumerate(DAYS)
        for h in ("15", "19")
    ]
    data, engine = _taught_engine(client, tmp_path)
    sim.config.page_cap = 5_000
    sim.reset_counters()
    (o,) = engine.run({"XELB": windows})
    assert o.error is None and o.written == 16
    log = sim.request_log()
    spans = {(r.gte_ns, r.lt_ns) for r in log if not r.cursor}
    assert any(hi - lo > DAY_NS for lo, hi in spans), spans  # ranges cross days
    assert sum(r.cursor for r in log) >= 4  # ... over several pages
    kept = want_rows = 0
    for w in windows:
        d = store.event_dir(data, "XELB", w.event_id)
        trades = pl.read_parquet(d / "trades.parquet")
        want = shape.shape_trades(truth_frame("trades", "XELB", w.start_ns, w.end_ns), w.start_ns, w.end_ns)
        quotes = pl.read_parquet(d / "quotes.parquet")
        qwant = shape.shape_quotes(
            truth_frame("quotes", "XELB", w.start_ns, w.end_ns), w.start_ns, w.end_ns, 1.0
        )
        kept += trades.height
        want_rows += want.height
        assert trades.equals(want), (w.event_id, trades.height, want.height)
        assert quotes.height > 0 and quotes.equals(qwant), w.event_id
    assert kept == want_rows > 0
    assert o.stats.rows_kept == sum(
        pl.read_parquet(store.event_dir(data, "XELB", w.event_id) / f).height
        for w in windows
        for f in ("trades.parquet", "quotes.parquet")
    )


def _digest(root: Path) -> dict[str, str]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_genuine_duplicates_and_identical_trades_are_all_kept_and_sequence_unique_warns(
    sim: Simulator, client: PolygonClient, tmp_path: Path
) -> None:
    """A tape where 4 % of trades reuse the previous trade's sequence number and 2 % are served
    twice, identical in every field: the client keeps every one (across 60-row page seams too),
    the written files are the ground truth, and ``sequence_unique`` warns with the counts and
    examples, leaving the files untouched."""
    sim.config.duplicate_sequence_rate = 0.04
    sim.config.identical_trade_rate = 0.02
    sim.config.page_cap = 60
    lo, hi = ns("2024-03-05T15:00:00"), ns("2024-03-05T15:20:00")
    got = client.fetch_range("trades", "AAOI", lo, hi, FetchStats())
    want = truth_frame("trades", "AAOI", lo, hi, sim.config)
    identical = want.height - want.unique().height
    repeated = want.height - want["sequence_number"].n_unique()
    assert identical > 5 and repeated > identical + 10, (identical, repeated)
    assert got.height == want.height and got.equals(want)
    assert got.height - got.unique().height == identical

    windows = [Window("AAOI_A", lo, lo + 10 * 60 * 10**9), Window("AAOI_B", lo + 10 * 60 * 10**9, hi)]
    data = tmp_path / "d"
    (o,) = FetchEngine(client, str(data), workers=4).run({"AAOI": windows})
    assert o.error is None and o.written == 2
    files = {w.event_id: pl.read_parquet(store.event_dir(data, "AAOI", w.event_id) / "trades.parquet")
             for w in windows}
    for w in windows:
        truth = shape.shape_trades(truth_frame("trades", "AAOI", w.start_ns, w.end_ns, sim.config),
                                   w.start_ns, w.end_ns)
        assert files[w.event_id].equals(truth)
    before = _digest(data)
    results = {r.name: r for r in check.evaluate_symbol(data, "AAOI", windows, 1.0)}
    seq = results["sequence_unique"]
    assert not seq.passed and seq.severity == "WARN"
    assert seq.metadata["failing"] == 2 and seq.metadata["checked"] == 2
    assert seq.metadata["duplicate_rows"] == repeated
    assert seq.metadata["identical_rows"] == identical
    examples = str(seq.metadata["duplicate_examples"])
    first = next(
        q for q, n in files["AAOI_A"].group_by("sequence_number").len().sort("sequence_number").iter_rows()
        if n > 1
    )
    assert examples.startswith(f"AAOI_A sequence_number {first}: ") and examples.count(";") == 4
    assert all(r.passed for name, r in results.items() if name != "sequence_unique"), results
    assert _digest(data) == before  # the check read the files and changed nothing
