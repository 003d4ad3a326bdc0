"""Calendar edges, end to end on the simulator: sessions and windows across the two DST changes of
2024 (the change Sundays themselves and the trading days either side), the first and last minute of
the extended session (03:59 and 20:00 New York, both OFF), a weekend and exchange holidays (empty
but complete), and the last trading day of 2024 with windows across midnight UTC (and the UTC new
year). The manifest's ids, sessions and windows are asserted exactly, the files against the
simulator's ground truth; the simulator serves no ticks on closed days and the planner prices them
at nothing (``trading_calendar``).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import holidays
import polars as pl
import pytest
import requests

from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.manifest import build_manifest, session_of
from smallcaps_ingest.core.plan import DensityStore, session_segments
from smallcaps_ingest.core.trading_calendar import FIRST_YEAR, HOLIDAYS, LAST_YEAR, is_trading_day
from smallcaps_ingest.simulator import Simulator, ground_truth
from smallcaps_ingest_tests.conftest import TEST_KEY, cli_env
from smallcaps_ingest_tests.pipeline.test_dagster import (
    CHECK_NAMES,
    _assert_symbol_exact,
    _check_status,
    _instance,
    materialize,
)

NY = ZoneInfo("America/New_York")
NS = 1_000_000_000
SYMBOL = "AAOI"


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# (event type, instant in UTC, New York wall clock it is, session, window has ticks)
EDGES: list[tuple[str, datetime, str, str, bool]] = [
    # spring forward: Friday before (EST, UTC-5), the change Sunday (02:00 EST -> 03:00 EDT), Monday (EDT)
    ("dst", _utc(2024, 3, 8, 14, 28), "2024-03-08 09:28 EST", "PM", True),
    ("dst", _utc(2024, 3, 10, 7, 1), "2024-03-10 03:01 EDT", "OFF", False),  # window from 01:58 EST
    ("dst", _utc(2024, 3, 10, 14, 0), "2024-03-10 10:00 EDT", "OFF", False),
    ("dst", _utc(2024, 3, 11, 13, 28), "2024-03-11 09:28 EDT", "PM", True),  # window across the open
    # fall back: Friday before (EDT), the change Sunday (02:00 EDT -> 01:00 EST), Monday (EST)
    ("dst", _utc(2024, 11, 1, 19, 58), "2024-11-01 15:58 EDT", "RTH", True),
    ("dst", _utc(2024, 11, 3, 5, 58), "2024-11-03 01:58 EDT", "OFF", False),  # window to 01:05 EST
    ("dst", _utc(2024, 11, 3, 15, 0), "2024-11-03 10:00 EST", "OFF", False),
    ("dst", _utc(2024, 11, 4, 14, 28), "2024-11-04 09:28 EST", "PM", True),
    # the extended session's edges on a trading day: 03:59 and 20:00 are OFF, their windows are not
    ("session_edge", _utc(2024, 3, 12, 7, 59), "2024-03-12 03:59 EDT", "OFF", True),
    ("session_edge", _utc(2024, 3, 13, 0, 0), "2024-03-12 20:00 EDT", "OFF", True),  # across 00:00 UTC
    # closed days: a Saturday, Good Friday, Independence Day, New Year's Day
    ("closed", _utc(2024, 3, 9, 15, 0), "2024-03-09 10:00 EST", "OFF", False),
    ("closed", _utc(2024, 3, 29, 14, 0), "2024-03-29 10:00 EDT", "OFF", False),
    ("closed", _utc(2024, 7, 4, 14, 0), "2024-07-04 10:00 EDT", "OFF", False),
    ("closed", _utc(2025, 1, 1, 15, 0), "2025-01-01 10:00 EST", "OFF", False),
    # the last trading day of 2024: a window across midnight UTC and the UTC new year, and one that
    # starts in 2025 UTC and runs past the 20:00 close
    ("year_end", _utc(2024, 12, 31, 23, 58), "2024-12-31 18:58 EST", "AH", True),
    ("year_end", _utc(2025, 1, 1, 0, 57), "2024-12-31 19:57 EST", "AH", True),
]


def _event_id(event_type: str, ts: datetime) -> str:
    ns = int(ts.timestamp()) * NS
    digest = hashlib.sha256(f"{SYMBOL}|{event_type}|{ns}".encode()).hexdigest()[:8]
    return f"{SYMBOL}_{event_type}_{ts:%Y%m%d_%H%M%S}_{digest}"


def _events() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "symbol": [SYMBOL] * len(EDGES),
            "event_type": [e[0] for e in EDGES],
            # written in New York time, as a user's file would be
            "timestamp": pl.Series(
                [e[1] for e in EDGES], dtype=pl.Datetime("us", "UTC")
            ).dt.convert_time_zone("America/New_York"),
        }
    )


def _expected_manifest() -> list[tuple[str, str, datetime, datetime, str]]:
    rows = [
        (_event_id(t, ts), t, ts - timedelta(minutes=3), ts + timedelta(minutes=7), session)
        for t, ts, _, session, _ in EDGES
    ]
    return sorted(rows, key=lambda r: (r[2], r[0]))


def test_the_edges_are_what_they_say() -> None:
    """The table above is right about its wall clocks (so the expectations are not circular)."""
    for _, ts, wall, _, _ in EDGES:
        assert ts.astimezone(NY).strftime("%Y-%m-%d %H:%M %Z") == wall


def test_holiday_table_matches_the_holidays_packages_nyse_calendar() -> None:
    nyse = holidays.financial_holidays("NYSE", years=range(FIRST_YEAR, LAST_YEAR + 1))
    assert sorted(HOLIDAYS) == sorted(d for d in nyse if d.weekday() < 5)
    assert min(HOLIDAYS).year == FIRST_YEAR and max(HOLIDAYS).year == LAST_YEAR
    assert is_trading_day(date(2024, 12, 31)) and not is_trading_day(date(2025, 1, 9))  # Carter mourning day
    assert not is_trading_day(date(2024, 3, 10)) and is_trading_day(date(2021, 12, 31))  # no Friday off


def test_manifest_sessions_and_windows_exact() -> None:
    manifest, stats = build_manifest(_events())
    got = manifest.select("event_id", "event_type", "ts_start", "ts_end", "session").rows()
    assert got == _expected_manifest()
    assert manifest.schema["ts_start"] == pl.Datetime("ns", "UTC")
    assert stats.per_session == {"PM": 3, "RTH": 1, "AH": 2, "OFF": 10}
    assert [session_of(ts) for _, ts, _, _, _ in EDGES] == [e[3] for e in EDGES]


def test_simulator_serves_no_ticks_on_closed_days(sim: Simulator) -> None:
    def day_ns(d: date) -> tuple[int, int]:
        start = datetime(d.year, d.month, d.day, tzinfo=NY)
        return int(start.timestamp()) * NS, int((start + timedelta(days=1)).timestamp()) * NS

    for d in (date(2024, 7, 4), date(2024, 3, 29), date(2025, 1, 1), date(2025, 1, 9), date(2024, 3, 9)):
        lo, hi = day_ns(d)
        assert ground_truth("trades", "HVY", lo, hi) == [] and ground_truth("quotes", "HVY", lo, hi) == []
    for d in (date(2024, 7, 3), date(2024, 7, 5), date(2024, 12, 31)):
        assert len(ground_truth("trades", "HVY", *day_ns(d))) > 1000
    # over HTTP, both orders: Jul 3 (a session), Jul 4 (holiday), Jul 5 (a session), one page each way
    lo, hi = day_ns(date(2024, 7, 3))[0], day_ns(date(2024, 7, 5))[1]
    truth = ground_truth("trades", "XELB", lo, hi)
    assert {datetime.fromtimestamp(r["sip_timestamp"] // NS, NY).date() for r in truth} == {
        date(2024, 7, 3),
        date(2024, 7, 5),
    }
    for order, want in (("asc", truth), ("desc", truth[::-1])):
        body = requests.get(
            f"{sim.base_url}/v3/trades/XELB",
            params={"timestamp.gte": lo, "timestamp.lt": hi, "order": order, "limit": 50000},
            headers={"Authorization": "Bearer k"},
            timeout=30,
        ).json()
        assert body["results"] == want and "next_url" not in body


def test_planner_prices_a_closed_day_at_nothing(tmp_path: Path) -> None:
    lo = int(datetime(2024, 7, 4, tzinfo=NY).timestamp()) * NS
    assert session_segments(lo, lo + 86_400 * NS) == [("OFF", 86_400.0)]
    density = DensityStore(tmp_path / "density.json")
    # Jul 3 20:00 -> Jul 5 04:00 ET is overnight, a holiday and overnight: no rows expected
    a = int(datetime(2024, 7, 3, 20, tzinfo=NY).timestamp()) * NS
    b = int(datetime(2024, 7, 5, 4, tzinfo=NY).timestamp()) * NS
    assert density.expected_rows(SYMBOL, "trades", a, b) == 0.0
    assert density.expected_rows(SYMBOL, "trades", a - 3600 * NS, b) > 0  # the hour before 20:00 is AH


@pytest.fixture
def env(tmp_path: Path, sim: Simulator) -> dict[str, str]:
    events = tmp_path / "events.parquet"
    _events().write_parquet(events)
    return cli_env(
        tmp_path,
        POLYGON_BASE_URL=sim.base_url,
        POLYGON_API_KEY=TEST_KEY,
        POLYGON_MAX_RPS="200",
        POLYGON_BUDGET_PATH=str(tmp_path / "budget.sqlite"),
        SMALLCAPS_EVENTS=str(events),
    )


def test_calendar_edges_end_to_end_exact(env: dict[str, str], sim: Simulator) -> None:
    data = Path(env["SMALLCAPS_DATA_DIR"])
    materialize(env, "--select", "manifest")
    manifest = pl.read_parquet(data / "manifest.parquet")
    assert manifest.select("event_id", "event_type", "ts_start", "ts_end", "session").rows() == (
        _expected_manifest()
    )
    materialize(env, "--select", "event_windows", "--partition", SYMBOL)
    assert _assert_symbol_exact(data, SYMBOL, manifest) == len(EDGES)
    status = _check_status(_instance(env))
    assert {name: status[(name, SYMBOL)] for name in CHECK_NAMES} == dict.fromkeys(CHECK_NAMES, "SUCCEEDED")

    for t, ts, wall, _, has_ticks in EDGES:
        d = store.event_dir(data, SYMBOL, _event_id(t, ts))
        trades, quotes = pl.read_parquet(d / "trades.parquet"), pl.read_parquet(d / "quotes.parquet")
        assert dict(trades.schema) == shape.TRADES_SCHEMA and dict(quotes.schema) == shape.QUOTES_SCHEMA, wall
        assert (trades.height > 0 and quotes.height > 0) == has_ticks, wall
        if not has_ticks:
            assert trades.height == 0 and quotes.height == 0, wall
    # where the windows cross an edge, the ticks stop (or start) at it
    first = _trades(data, "session_edge", _utc(2024, 3, 12, 7, 59))
    assert first.min() >= _utc(2024, 3, 12, 8, 0)  # type: ignore[operator]
    last = _trades(data, "session_edge", _utc(2024, 3, 13, 0, 0))
    assert last.max() < _utc(2024, 3, 13, 0, 0)  # type: ignore[operator]
    across = _trades(data, "year_end", _utc(2024, 12, 31, 23, 58))
    assert across.min() < _utc(2025, 1, 1) <= across.max()  # type: ignore[operator]
    late = _trades(data, "year_end", _utc(2025, 1, 1, 0, 57))
    assert late.max() < _utc(2025, 1, 1, 1, 0)  # type: ignore[operator]  # 20:00 EST
    # the open on the Monday after spring forward is at 13:30 UTC: the window holds PM and RTH rows
    monday = _trades(data, "dst", _utc(2024, 3, 11, 13, 28))
    assert monday.min() < _utc(2024, 3, 11, 13, 30) <= monday.max()  # type: ignore[operator]


def _trades(data: Path, event_type: str, ts: datetime) -> pl.Series:
    path = store.event_dir(data, SYMBOL, _event_id(event_type, ts)) / "trades.parquet"
    return pl.read_parquet(path)["sip_timestamp"]
