"""Tests for smallcaps_ingest.core.events: every rejection names the problem; good input round-trips."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import polars as pl
import pytest

from smallcaps_ingest.core.events import SYMBOL_RE, EventsValidationError, read_events, validate_events
from smallcaps_ingest.core.manifest import build_manifest
from smallcaps_ingest.simulator.sample import SAMPLE_EVENTS_PATH

NY = "America/New_York"


def _events(
    symbols: list | None = None,
    event_types: list | None = None,
    stamps: list | None = None,
    **extra: list,
) -> pl.DataFrame:
    """A small valid events frame (3 rows) with any column overridden."""
    symbols = symbols if symbols is not None else ["AAOI", "BRK.B", "XELB"]
    n = len(symbols)
    event_types = event_types if event_types is not None else ["volume_spike"] * n
    stamps = stamps if stamps is not None else [datetime(2024, 3, 11, 9, 30 + i) for i in range(n)]
    ts = pl.Series("timestamp", stamps, dtype=pl.Datetime("us")).dt.replace_time_zone(NY)
    return pl.DataFrame({"symbol": symbols, "event_type": event_types}).with_columns(ts, **extra)


def _write(tmp_path: Path, df: pl.DataFrame, name: str = "events.parquet") -> Path:
    path = tmp_path / name
    df.write_parquet(path)
    return path


def _listing(tmp_path: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))


def _raises(path_or_df: Path | pl.DataFrame, *fragments: str) -> str:
    """Assert reading/validating raises and that the message contains every fragment."""
    with pytest.raises(EventsValidationError) as info:
        if isinstance(path_or_df, pl.DataFrame):
            validate_events(path_or_df, source="ev.parquet")
        else:
            read_events(path_or_df)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


# --- the file itself -------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    _raises(tmp_path / "nope.parquet", "nope.parquet", "does not exist")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    _raises(tmp_path, "is not a file")


def test_csv_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("symbol,event_type,timestamp\nAAOI,news,2024-03-11T09:30:00-04:00\n")
    msg = _raises(path, f"{path} is not a Parquet file", "CSV")
    assert "symbol,event_type,timestamp" in msg


def test_random_bytes_are_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    path.write_bytes(bytes(range(256)) * 4)
    _raises(path, f"{path} is not a Parquet file")


def test_empty_file_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    path.write_bytes(b"")
    _raises(path, "is not a Parquet file", "empty")


def test_corrupt_parquet(tmp_path: Path) -> None:
    good = _write(tmp_path, _events()).read_bytes()
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(good[:8] + b"\x00" * (len(good) - 16) + good[-8:])
    _raises(path, str(path), "not a readable Parquet file")


# --- columns and dtypes ----------------------------------------------------------------------


def test_missing_columns_listed_with_found(tmp_path: Path) -> None:
    path = _write(tmp_path, _events().drop("event_type", "timestamp"))
    _raises(path, "missing required column(s) ['event_type', 'timestamp']", "columns found: ['symbol']")


def test_manifest_is_recognised(tmp_path: Path) -> None:
    manifest, _ = build_manifest(validate_events(_events()))
    path = _write(tmp_path, manifest, "manifest.parquet")
    _raises(path, "this looks like a manifest, not an events file")
    # Also when the manifest lacks some of the events columns.
    _raises(_write(tmp_path, manifest.drop("event_type")), "missing", "looks like a manifest")


def test_trades_output_is_recognised(tmp_path: Path) -> None:
    trades = pl.DataFrame(
        {"event_id": ["x"], "sip_timestamp": [1], "price": [1.0], "size": [100], "conditions": [[12]]}
    )
    _raises(_write(tmp_path, trades), "missing", "looks like trades/quotes output")
    quotes = pl.DataFrame({"symbol": ["AAOI"], "sip_timestamp": [1], "bid_price": [1.0], "ask_price": [1.1]})
    _raises(_write(tmp_path, quotes), "missing", "looks like trades/quotes output")


def test_reserved_extra_column(tmp_path: Path) -> None:
    path = _write(tmp_path, _events(session=["RTH", "RTH", "RTH"]))
    _raises(path, "['session']", "reserved")


def test_timestamp_as_string(tmp_path: Path) -> None:
    df = _events().with_columns(pl.Series("timestamp", ["2024-03-11 09:30:00", "x", "y"]))
    _raises(_write(tmp_path, df), "'timestamp' is a string", "'2024-03-11 09:30:00'")


def test_timestamp_without_time_zone(tmp_path: Path) -> None:
    df = _events().with_columns(pl.col("timestamp").dt.replace_time_zone(None))
    _raises(_write(tmp_path, df), "timestamp", "has no time zone")


@pytest.mark.parametrize(
    ("values", "dtype"),
    [([date(2024, 3, 11)] * 3, "Date"), ([1, 2, 3], "Int64"), ([1.0, 2.0, 3.0], "Float64")],
)
def test_timestamp_other_dtype(tmp_path: Path, values: list, dtype: str) -> None:
    df = _events().with_columns(pl.Series("timestamp", values))
    _raises(_write(tmp_path, df), "'timestamp' must be a Datetime with a time zone", dtype)


@pytest.mark.parametrize("col", ["symbol", "event_type"])
def test_string_columns_must_be_string(tmp_path: Path, col: str) -> None:
    df = _events().with_columns(pl.Series(col, [1, 2, 3]))
    _raises(_write(tmp_path, df), f"'{col}' must be String", "Int64")


def test_all_null_column() -> None:
    df = _events().with_columns(pl.lit(None).alias("event_type"))
    assert df.schema["event_type"] == pl.Null
    _raises(df, "'event_type' has only nulls")


@pytest.mark.parametrize("col", ["symbol", "event_type", "timestamp"])
def test_nulls_name_column_first_row_and_count(tmp_path: Path, col: str) -> None:
    df = _events(["AAOI", "BBIG", "CLOV", "DGLY"]).with_columns(
        pl.when(pl.int_range(pl.len()) >= 2).then(None).otherwise(pl.col(col)).alias(col)
    )
    _raises(_write(tmp_path, df), f"'{col}' has 2 null value(s); first at row 2")


def test_empty_input(tmp_path: Path) -> None:
    _raises(_write(tmp_path, _events().head(0)), "has no rows")


def test_timestamp_out_of_nanosecond_range(tmp_path: Path) -> None:
    df = _events(stamps=[datetime(2024, 1, 2, 10), datetime(2300, 1, 1), datetime(2024, 1, 3, 10)])
    _raises(_write(tmp_path, df), "'timestamp', row 1", "2300-01-01", "out of range")


# --- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("aapl", "lowercase"),
        ("Brk.B", "lowercase"),
        ("A/B", "path characters"),
        ("..", "path characters"),
        ("A..B", "path characters"),
        ("AB\\C", "path characters"),
        ("ABCDEFGHIJK", "too long (11 characters"),
        ("BRK.", "must not end with '.'"),
        (".A", "start with a letter"),
        ("1ABC", "start with a letter"),
        ("-ABC", "start with a letter"),
        ("AB C", "whitespace"),
        ("AAPL\n", "whitespace"),
        ("", "empty"),
        ("AB_C", "characters outside"),
        ("ÄBC", "start with a letter A-Z"),
        ("AÄB", "characters outside"),
    ],
)
def test_bad_symbols(tmp_path: Path, bad: str, reason: str) -> None:
    df = _events(["AAOI", "BRK.B", bad, "XELB"])
    _raises(_write(tmp_path, df), "'symbol', row 2", repr(bad), reason)


def test_bad_symbols_are_counted() -> None:
    msg = _raises(_events(["AAOI", "x", "y/z", "BRK..B"]), "row 1", "'x'")
    assert "2 more row(s)" in msg


@pytest.mark.parametrize("good", ["A", "BRK.B", "BF-B", "ABCDEFGHIJ", "X1", "AAOI"])
def test_good_symbols(good: str) -> None:
    assert SYMBOL_RE.fullmatch(good)
    validate_events(_events([good]))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "empty"),
        ("   ", "characters outside [A-Za-z0-9_]: [' ']"),
        ("news/wire", "characters outside [A-Za-z0-9_]: ['/']"),
        ("../etc", "characters outside [A-Za-z0-9_]: ['.', '/']"),
        ("gap up!", "[' ', '!']"),
        ("VWAP-BREAK", "['-']"),
        ("Halt: resume", "[' ', ':']"),
        ("news.PR", "['.']"),
        ("news\n", "['\\n']"),
        ("café", "['é']"),
        ("_news", "must start with a letter or digit"),
        ("x" * 41, "too long (41 characters, at most 40)"),
    ],
)
def test_bad_event_types(tmp_path: Path, bad: str, reason: str) -> None:
    df = _events(event_types=["news", bad, "gap_up"])
    msg = _raises(_write(tmp_path, df), "'event_type', row 1", repr(bad), reason)
    assert "^[A-Za-z0-9][A-Za-z0-9_]{0,39}$" in msg


@pytest.mark.parametrize("good", ["vwap_break", "flush", "news", "V2", "9am_gap", "Halt_Resume", "x" * 40])
def test_good_event_types(good: str) -> None:
    assert validate_events(_events(event_types=["news", good, "gap_up"]))["event_type"][1] == good


def test_first_problem_wins_in_column_order() -> None:
    """Symbols are checked before event types, whatever the row order."""
    _raises(_events(["AAOI", "BBIG", "bad"], ["news", "bad/type", "news"]), "'symbol', row 2")
    _raises(_events(["AAOI", "BBIG", "CLOV"], ["news", "bad/type", "bad type"]), "'event_type', row 1")


# --- good input ------------------------------------------------------------------------------


def test_good_file_round_trips_and_keeps_extras(tmp_path: Path) -> None:
    df = _events(
        event_types=["volume_spike", "Halt_resume", "news_PR"],
        score=[1.5, None, 3.0],
        note=["a", "b", "c"],
    )
    path = _write(tmp_path, df)
    out = read_events(path)
    assert out.columns == ["symbol", "event_type", "timestamp", "score", "note"]
    assert out.schema["timestamp"] == pl.Datetime("ns", "UTC")
    assert out.drop("timestamp").equals(df.drop("timestamp"))
    assert (out["timestamp"] == df["timestamp"].dt.convert_time_zone("UTC")).all()
    assert out["timestamp"][0] == datetime.fromisoformat("2024-03-11T13:30:00+00:00")


@pytest.mark.parametrize("unit", ["ms", "us", "ns"])
@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Tokyo"])
def test_any_unit_and_time_zone(unit: str, tz: str) -> None:
    df = _events().with_columns(pl.col("timestamp").dt.cast_time_unit(unit).dt.convert_time_zone(tz))  # type: ignore[arg-type]
    out = validate_events(df)
    assert out.schema["timestamp"] == pl.Datetime("ns", "UTC")
    assert out["timestamp"].dt.epoch("ms").to_list() == df["timestamp"].dt.epoch("ms").to_list()


def test_read_events_writes_nothing(tmp_path: Path) -> None:
    good = _write(tmp_path, _events())
    bad = _write(tmp_path, _events(["bad"]), "bad.parquet")
    csv = tmp_path / "events.csv"
    csv.write_text("a,b\n1,2\n")
    before = _listing(tmp_path)
    read_events(good)
    for path in (bad, csv, tmp_path / "missing.parquet"):
        with pytest.raises(EventsValidationError):
            read_events(path)
    assert _listing(tmp_path) == before


def test_bundled_sample_validates() -> None:
    out = read_events(SAMPLE_EVENTS_PATH)
    assert out.height > 250
    assert out.columns == ["symbol", "event_type", "timestamp", "score"]
    assert out.schema["timestamp"] == pl.Datetime("ns", "UTC")


def test_accepts_str_path(tmp_path: Path) -> None:
    assert read_events(str(_write(tmp_path, _events()))).height == 3
