"""Tests for smallcaps_ingest.core.manifest (ids, windows, sessions, dedup, filter) and the bundled sample."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from smallcaps_ingest.core.events import read_events, validate_events
from smallcaps_ingest.core.manifest import (
    MANIFEST_COLUMNS,
    ManifestStats,
    build_manifest,
    make_event_id,
    session_of,
)
from smallcaps_ingest.simulator.sample import (
    SAMPLE_EVENT_COUNTS,
    SAMPLE_EVENTS_PATH,
    SAMPLE_SYMBOLS,
    make_sample_events,
)

NY = ZoneInfo("America/New_York")
UTC_NS = pl.Datetime("ns", "UTC")


def _events(rows: list[tuple[str, str, datetime]], **extra: list) -> pl.DataFrame:
    """Validated events frame from (symbol, event_type, aware datetime) rows."""
    symbols, types, stamps = zip(*rows, strict=True)
    df = pl.DataFrame(
        {
            "symbol": list(symbols),
            "event_type": list(types),
            "timestamp": pl.Series([t.astimezone(UTC) for t in stamps], dtype=pl.Datetime("us", "UTC")),
            **extra,
        }
    )
    return validate_events(df)


def _ny(*args: int) -> datetime:
    return datetime(*args, tzinfo=NY)  # type: ignore[misc]


# --- event_id --------------------------------------------------------------------------------


def test_event_id_hand_computed() -> None:
    # 2024-03-11 09:30:00.123456 EDT == 13:30:00.123456 UTC == 1710163800.123456 s since the epoch.
    ts = _ny(2024, 3, 11, 9, 30, 0, 123456)
    expected_hash = hashlib.sha256(b"BRK.B|halt_resume|1710163800123456000").hexdigest()[:8]
    expected = f"BRK.B_halt_resume_20240311_133000_{expected_hash}"
    assert make_event_id("BRK.B", "halt_resume", ts) == expected
    manifest, _ = build_manifest(_events([("BRK.B", "halt_resume", ts)]))
    assert manifest["event_id"].to_list() == [expected]


@pytest.mark.parametrize(
    ("symbol", "event_type", "ts", "shape"),
    [
        # the users' old system's ids (their hashes are illustrative, so only the shape is compared)
        ("AAL", "vwap_break", _ny(2023, 9, 7, 11, 16), "AAL_vwap_break_20230907_151600_1a2b3c4d"),
        ("TSLA", "flush", _ny(2023, 4, 20, 15, 58), "TSLA_flush_20230420_195800_9f8e7d6c"),
        ("AAOI", "Gap_Up2", _ny(2024, 1, 10, 10, 0), "AAOI_Gap_Up2_20240110_150000_00000000"),
    ],
)
def test_event_id_keeps_the_type_as_written(symbol: str, event_type: str, ts: datetime, shape: str) -> None:
    eid = make_event_id(symbol, event_type, ts)
    ns = int(ts.timestamp()) * 10**9
    assert eid[:-8] == shape[:-8]
    assert eid[-8:] == hashlib.sha256(f"{symbol}|{event_type}|{ns}".encode()).hexdigest()[:8]
    assert eid == build_manifest(_events([(symbol, event_type, ts)]))[0]["event_id"][0]


@pytest.mark.parametrize("bad", ["vwap-break", "Halt: resume", "../x", "_news", ""])
def test_event_id_refuses_a_type_that_is_not_path_safe(bad: str) -> None:
    ts = _ny(2024, 1, 10, 10, 0, 0)
    with pytest.raises(ValueError, match="does not match"):
        make_event_id("AAOI", bad, ts)
    raw = pl.DataFrame(
        {"symbol": ["AAOI", "AAOI"], "event_type": ["news", bad], "timestamp": [ts, ts]},
        schema_overrides={"timestamp": pl.Datetime("us", "America/New_York")},
    )
    with pytest.raises(ValueError, match=r"'event_type', row 1"):  # unvalidated input, too
        build_manifest(raw)


def test_event_id_case_of_the_type_matters() -> None:
    ts = _ny(2024, 1, 10, 10, 0, 0)
    a, b = make_event_id("AAOI", "gap_up", ts), make_event_id("AAOI", "GAP_UP", ts)
    assert a.startswith("AAOI_gap_up_") and b.startswith("AAOI_GAP_UP_") and a[-8:] != b[-8:]


def test_event_id_int_nanoseconds_and_naive_rejected() -> None:
    ts = _ny(2024, 1, 10, 10, 0, 0, 5)
    ns = int(ts.timestamp()) * 10**9 + 5_000
    assert make_event_id("AAOI", "news", ns) == make_event_id("AAOI", "news", ts)
    with pytest.raises(ValueError, match="no time zone"):
        make_event_id("AAOI", "news", datetime(2024, 1, 10, 10))


def test_event_id_keeps_nanoseconds() -> None:
    ns = 1_710_163_800_123_456_789
    df = pl.DataFrame({"symbol": ["AAOI"], "event_type": ["news"], "timestamp": pl.Series([ns]).cast(UTC_NS)})
    manifest, _ = build_manifest(df)
    expected_hash = hashlib.sha256(f"AAOI|news|{ns}".encode()).hexdigest()[:8]
    assert manifest["event_id"][0] == f"AAOI_news_20240311_133000_{expected_hash}"
    assert make_event_id("AAOI", "news", ns) == manifest["event_id"][0]
    assert manifest["ts_start"].cast(pl.Int64)[0] == ns - 180 * 10**9


def test_make_event_id_equals_vectorised_on_sample() -> None:
    manifest, _ = build_manifest(read_events(SAMPLE_EVENTS_PATH))
    scalar = [
        make_event_id(s, e, t) for s, e, t in manifest.select("symbol", "event_type", "timestamp").rows()
    ]
    assert scalar == manifest["event_id"].to_list()
    assert manifest["event_id"].n_unique() == manifest.height
    assert all(re.fullmatch(r"[A-Z0-9.-]+_[a-z_]+_\d{8}_\d{6}_[0-9a-f]{8}", e) for e in scalar)
    assert {e.split("_", 1)[1].rsplit("_", 3)[0] for e in scalar} == set(manifest["event_type"])
    assert not any(".." in e or "/" in e for e in scalar)


# --- sessions --------------------------------------------------------------------------------

_BOUNDARIES = [
    ((0, 0, 0, 0), "OFF"),
    ((3, 59, 59, 999999), "OFF"),
    ((4, 0, 0, 0), "PM"),
    ((9, 29, 59, 999999), "PM"),
    ((9, 30, 0, 0), "RTH"),
    ((15, 59, 59, 999999), "RTH"),
    ((16, 0, 0, 0), "AH"),
    ((19, 59, 59, 999999), "AH"),
    ((20, 0, 0, 0), "OFF"),
    ((23, 59, 59, 999999), "OFF"),
]


@pytest.mark.parametrize("day", [date(2024, 1, 10), date(2024, 3, 11), date(2024, 3, 8), date(2024, 7, 15)])
@pytest.mark.parametrize(("clock", "session"), _BOUNDARIES)
def test_session_boundaries(day: date, clock: tuple[int, int, int, int], session: str) -> None:
    ts = _ny(day.year, day.month, day.day, *clock)
    assert session_of(ts) == session
    assert session_of(ts.astimezone(UTC)) == session
    manifest, _ = build_manifest(_events([("AAOI", "news", ts)]))
    assert manifest["session"].to_list() == [session]


def test_session_dst_shifts_utc_hours() -> None:
    """13:30 UTC is the open in summer (EDT) but 08:30 pre-market in winter (EST)."""
    assert session_of(datetime(2024, 3, 11, 13, 30, tzinfo=UTC)) == "RTH"
    assert session_of(datetime(2024, 3, 8, 13, 30, tzinfo=UTC)) == "PM"
    assert session_of(datetime(2024, 3, 8, 14, 30, tzinfo=UTC)) == "RTH"
    with pytest.raises(ValueError, match="no time zone"):
        session_of(datetime(2024, 3, 8, 14, 30))


# --- windows ---------------------------------------------------------------------------------


def test_window_bounds_default_and_custom() -> None:
    ts = _ny(2024, 3, 11, 9, 30, 0, 250)
    events = _events([("AAOI", "news", ts)])
    manifest, _ = build_manifest(events)
    assert manifest.schema["timestamp"] == UTC_NS
    assert manifest.schema["ts_start"] == UTC_NS
    assert manifest.schema["ts_end"] == UTC_NS
    assert manifest["ts_start"][0] == ts - timedelta(minutes=3)
    assert manifest["ts_end"][0] == ts + timedelta(minutes=7)

    custom, _ = build_manifest(events, before=timedelta(0), after=timedelta(seconds=90))
    assert custom["ts_start"][0] == ts
    assert custom["ts_end"][0] == ts + timedelta(seconds=90)


@pytest.mark.parametrize(
    ("before", "after", "match"),
    [
        (timedelta(minutes=-1), timedelta(minutes=7), "negative"),
        (timedelta(minutes=3), timedelta(seconds=-1), "negative"),
        (timedelta(0), timedelta(0), "zero"),
    ],
)
def test_bad_windows(before: timedelta, after: timedelta, match: str) -> None:
    events = _events([("AAOI", "news", _ny(2024, 3, 11, 10, 0))])
    with pytest.raises(ValueError, match=match):
        build_manifest(events, before=before, after=after)


# --- dedup, conflicts, filter, shape ---------------------------------------------------------


def test_duplicates_dropped_and_counted() -> None:
    t1, t2 = _ny(2024, 3, 11, 10, 0), _ny(2024, 3, 11, 10, 1)
    events = _events(
        [("AAOI", "news", t1), ("AAOI", "news", t1), ("KOSS", "news", t2), ("AAOI", "news", t1)],
        score=[1.0, 1.0, 2.0, 1.0],
    )
    manifest, stats = build_manifest(events)
    assert stats.duplicates_dropped == 2
    assert stats.events == manifest.height == 2
    assert manifest["symbol"].to_list() == ["AAOI", "KOSS"]


def test_same_key_different_extras_is_an_error() -> None:
    t1 = _ny(2024, 3, 11, 10, 0)
    events = _events(
        [("AAOI", "news", t1), ("KOSS", "news", t1), ("AAOI", "news", t1)],
        score=[1.0, 2.0, 9.0],
    )
    with pytest.raises(ValueError, match=r"rows 0 and 2 .*'AAOI'.*'news'"):
        build_manifest(events)


def test_date_filter_uses_new_york_date_inclusive() -> None:
    late = _ny(2024, 1, 5, 19, 59, 59)  # 2024-01-06 00:59:59 UTC
    events = _events(
        [
            ("AAOI", "news", _ny(2024, 1, 4, 10, 0)),
            ("AAOI", "news", late),
            ("AAOI", "news", late),
            ("AAOI", "gap_up", _ny(2024, 1, 8, 4, 0)),
        ]
    )
    manifest, stats = build_manifest(events, start_date=date(2024, 1, 5), end_date=date(2024, 1, 5))
    assert manifest["timestamp"].to_list() == [late]
    assert (stats.duplicates_dropped, stats.filtered_out, stats.events) == (1, 2, 1)

    _, stats = build_manifest(events, start_date=date(2024, 1, 6))
    assert (stats.events, stats.filtered_out) == (1, 2)
    _, stats = build_manifest(events, end_date=date(2024, 1, 4))
    assert (stats.events, stats.filtered_out) == (1, 2)
    with pytest.raises(ValueError, match="after end_date"):
        build_manifest(events, start_date=date(2024, 1, 6), end_date=date(2024, 1, 5))


def test_columns_sort_and_stats() -> None:
    events = _events(
        [
            ("KOSS", "news", _ny(2024, 1, 4, 10, 0)),
            ("AAOI", "volume_spike", _ny(2024, 1, 4, 10, 0)),
            ("AAOI", "news", _ny(2024, 1, 4, 10, 0)),
            ("AAOI", "gap_up", _ny(2024, 1, 4, 8, 0)),
        ],
        score=[1.0, 2.0, 3.0, 4.0],
        note=["k", "v", "n", "g"],
    )
    manifest, stats = build_manifest(events)
    assert manifest.columns == [*MANIFEST_COLUMNS, "score", "note"]
    assert manifest["note"].to_list() == ["g", "n", "v", "k"]  # symbol, timestamp, then event_id
    assert stats == ManifestStats(
        events=4,
        symbols=2,
        per_session={"PM": 1, "RTH": 3, "AH": 0, "OFF": 0},
        duplicates_dropped=0,
        filtered_out=0,
    )


def test_input_timestamp_is_normalised_and_checked() -> None:
    ts = _ny(2024, 1, 4, 10, 0)
    df = pl.DataFrame(
        {
            "symbol": ["AAOI"],
            "event_type": ["news"],
            "timestamp": pl.Series([ts]).dt.convert_time_zone("Asia/Tokyo"),
        }
    )
    manifest, _ = build_manifest(df)
    assert manifest.schema["timestamp"] == UTC_NS
    assert manifest["timestamp"][0] == ts
    with pytest.raises(ValueError, match="time zone"):
        build_manifest(df.with_columns(pl.col("timestamp").dt.replace_time_zone(None)))
    with pytest.raises(ValueError, match="manifest column"):
        build_manifest(df.with_columns(session=pl.lit("RTH")))
    with pytest.raises(ValueError, match="missing"):
        build_manifest(df.drop("event_type"))


def test_empty_events_give_empty_manifest() -> None:
    events = _events([("AAOI", "news", _ny(2024, 1, 4, 10, 0))], score=[1.0]).head(0)
    manifest, stats = build_manifest(events)
    assert manifest.height == 0
    assert manifest.columns == [*MANIFEST_COLUMNS, "score"]
    assert stats.per_session == {"PM": 0, "RTH": 0, "AH": 0, "OFF": 0}


# --- bundled sample --------------------------------------------------------------------------


def test_bundled_sample_is_in_sync_with_generator() -> None:
    assert pl.read_parquet(SAMPLE_EVENTS_PATH).equals(make_sample_events())


def test_bundled_sample_shape() -> None:
    raw = pl.read_parquet(SAMPLE_EVENTS_PATH)
    assert raw.schema == pl.Schema(
        {
            "symbol": pl.String,
            "event_type": pl.String,
            "timestamp": pl.Datetime("us", "America/New_York"),
            "score": pl.Float64,
        }
    )
    ny = raw["timestamp"].dt.date()
    assert ny.min() >= date(2024, 1, 1)
    assert ny.max() <= date(2024, 6, 30)
    assert (raw["timestamp"].dt.weekday() <= 5).all()


def test_bundled_sample_manifest_counts() -> None:
    manifest, stats = build_manifest(read_events(SAMPLE_EVENTS_PATH))
    assert stats.events == 300
    assert stats.symbols == 15
    assert stats.duplicates_dropped == 3
    assert stats.filtered_out == 0
    assert stats.per_session == {"PM": 62, "RTH": 201, "AH": 33, "OFF": 4}
    assert all(stats.per_session[s] > 0 for s in ("PM", "RTH", "AH"))

    per_symbol = dict(manifest.group_by("symbol").len().iter_rows())
    assert per_symbol == SAMPLE_EVENT_COUNTS
    assert set(per_symbol) == set(SAMPLE_SYMBOLS)
    assert per_symbol["AAOI"] == 20
    assert "BRK.B" in per_symbol
    assert "XELB" in per_symbol


def test_bundled_sample_has_overlaps_and_in_play_days() -> None:
    manifest, _ = build_manifest(read_events(SAMPLE_EVENTS_PATH))
    overlapping = manifest.with_columns(prev_end=pl.col("ts_end").shift().over("symbol")).filter(
        pl.col("ts_start") < pl.col("prev_end")
    )
    assert overlapping.height >= 1
    assert "AAOI" in overlapping["symbol"].to_list()

    days = (
        manifest.group_by("symbol", pl.col("timestamp").dt.convert_time_zone("America/New_York").dt.date())
        .agg(n=pl.len(), span=pl.col("timestamp").max() - pl.col("timestamp").min())
        .filter((pl.col("n") >= 3) & (pl.col("span") > timedelta(hours=3)))
    )
    assert days["symbol"].n_unique() == 15  # every symbol has an in-play day
