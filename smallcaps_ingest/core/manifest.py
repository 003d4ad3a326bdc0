"""Build the event manifest: one row per unique event with a stable id, its window and its session.

The manifest is the contract between the events input and everything that fetches or stores ticks:
``event_id`` names partitions and files, so it must be path-safe and identical across runs and
machines (no Python ``hash()``, no polars hash, whose seeds/algorithms are not stable).
Pure polars; no Dagster, no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import polars as pl

from smallcaps_ingest.core.events import EVENT_TYPE_RE, check_event_types
from smallcaps_ingest.core.trading_calendar import HOLIDAYS, is_trading_day

__all__ = [
    "MANIFEST_COLUMNS",
    "NY_TZ",
    "SESSIONS",
    "ManifestStats",
    "build_manifest",
    "make_event_id",
    "session_of",
]

MANIFEST_COLUMNS: list[str] = [
    "event_id",
    "symbol",
    "event_type",
    "timestamp",
    "ts_start",
    "ts_end",
    "session",
]
NY_TZ = "America/New_York"
SESSIONS: tuple[str, ...] = ("PM", "RTH", "AH", "OFF")
_NY = ZoneInfo(NY_TZ)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UTC_NS = pl.Datetime("ns", "UTC")
# Session bounds in minutes after New York midnight: PM [04:00, 09:30), RTH [09:30, 16:00), AH [16:00, 20:00).
_PM_START, _RTH_START, _AH_START, _AH_END = 4 * 60, 9 * 60 + 30, 16 * 60, 20 * 60


@dataclass(frozen=True)
class ManifestStats:
    """Counts for logging/metadata; ``per_session`` always has the keys PM, RTH, AH, OFF (in that order)."""

    events: int
    symbols: int
    per_session: dict[str, int]
    duplicates_dropped: int
    filtered_out: int


def _hash8(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def _epoch_ns(ts: datetime) -> int:
    """Exact integer UTC nanoseconds of an aware datetime (no float rounding)."""
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _require_aware(ts: datetime, what: str) -> None:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"{what}: datetime {ts!r} has no time zone")


def make_event_id(symbol: str, event_type: str, ts: datetime | int) -> str:
    """Event id of one event, ``{symbol}_{event_type}_{YYYYMMDD_HHMMSS}_{HASH8}`` with the event type
    as given (the users' old system's ids); equals ``build_manifest``'s vectorised result, which
    joins the same four parts.

    ``ts`` is an aware datetime, or an int of UTC epoch nanoseconds for sub-microsecond timestamps
    (Python datetimes stop at microseconds). An event type outside ``EVENT_TYPE_RE`` (not path-safe)
    raises ``ValueError``.
    """
    if not EVENT_TYPE_RE.fullmatch(event_type):
        raise ValueError(f"make_event_id: event_type {event_type!r} does not match {EVENT_TYPE_RE.pattern}")
    if isinstance(ts, datetime):
        _require_aware(ts, "make_event_id")
        ns = _epoch_ns(ts)
    else:
        ns = int(ts)
    secs, _ = divmod(ns, 1_000_000_000)
    stamp = (_EPOCH + timedelta(seconds=secs)).strftime("%Y%m%d_%H%M%S")
    return f"{symbol}_{event_type}_{stamp}_{_hash8(f'{symbol}|{event_type}|{ns}')}"


def session_of(ts: datetime) -> str:
    """Trading session of an aware datetime by New York clock time: PM, RTH, AH or OFF (always OFF
    on a day that holds no session: weekends and NYSE holidays, ``trading_calendar``)."""
    _require_aware(ts, "session_of")
    local = ts.astimezone(_NY)
    if not is_trading_day(local.date()):
        return "OFF"
    minute = local.hour * 60 + local.minute
    if _PM_START <= minute < _RTH_START:
        return "PM"
    if _RTH_START <= minute < _AH_START:
        return "RTH"
    if _AH_START <= minute < _AH_END:
        return "AH"
    return "OFF"


def _session_expr(ts: pl.Expr) -> pl.Expr:
    local = ts.dt.convert_time_zone(NY_TZ)
    minute = local.dt.hour().cast(pl.Int32) * 60 + local.dt.minute().cast(pl.Int32)
    holidays = pl.Series(sorted(HOLIDAYS), dtype=pl.Date).implode()
    closed = (local.dt.weekday() > 5) | local.dt.date().is_in(holidays)  # polars: Monday 1 .. Sunday 7
    return (
        pl.when(closed)
        .then(pl.lit("OFF"))
        .when((minute >= _PM_START) & (minute < _RTH_START))
        .then(pl.lit("PM"))
        .when((minute >= _RTH_START) & (minute < _AH_START))
        .then(pl.lit("RTH"))
        .when((minute >= _AH_START) & (minute < _AH_END))
        .then(pl.lit("AH"))
        .otherwise(pl.lit("OFF"))
    )


def _hash8_series(keys: pl.Series) -> pl.Series:
    # polars has no stable sha256 expression, so hash in Python.
    return pl.Series(keys.name, [_hash8(k) for k in keys.to_list()], dtype=pl.String)


def _event_id_expr() -> pl.Expr:
    symbol, event_type, ts = pl.col("symbol"), pl.col("event_type"), pl.col("timestamp")
    key = pl.concat_str([symbol, event_type, ts.dt.epoch("ns").cast(pl.String)], separator="|")
    return pl.concat_str(
        [
            symbol,
            event_type,
            ts.dt.strftime("%Y%m%d_%H%M%S"),
            key.map_batches(_hash8_series, return_dtype=pl.String),
        ],
        separator="_",
    )


def _check_window(before: timedelta, after: timedelta) -> None:
    if before < timedelta(0) or after < timedelta(0):
        raise ValueError(f"before/after must not be negative (got before={before}, after={after})")
    if before + after == timedelta(0):
        raise ValueError("before + after is zero: the event window would be empty")


def _normalise_input(events: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in ("symbol", "event_type", "timestamp") if c not in events.columns]
    if missing:
        raise ValueError(f"events frame is missing column(s) {missing}; columns: {events.columns}")
    clash = [c for c in ("event_id", "ts_start", "ts_end", "session") if c in events.columns]
    if clash:
        raise ValueError(f"events frame already has manifest column(s) {clash}; is it a manifest?")
    dtype = events.schema["timestamp"]
    if not isinstance(dtype, pl.Datetime) or dtype.time_zone is None:
        raise ValueError(f"timestamp must be a Datetime with a time zone, got {dtype} (use read_events)")
    if dtype != _UTC_NS:
        events = events.with_columns(pl.col("timestamp").dt.convert_time_zone("UTC").dt.cast_time_unit("ns"))
    check_event_types(events, "events frame")  # ids hold the type as given: it must be path-safe
    return events


def _raise_on_conflicts(events: pl.DataFrame) -> None:
    """Same (symbol, event_type, timestamp) but different extra columns: ambiguous, refuse it."""
    key = ["symbol", "event_type", "timestamp"]
    conflicts = events.filter(pl.struct(key).is_duplicated()).sort([*key, "_row"])
    if conflicts.height == 0:
        return
    first = conflicts.row(0, named=True)
    rows = conflicts.filter(
        (pl.col("symbol") == first["symbol"])
        & (pl.col("event_type") == first["event_type"])
        & (pl.col("timestamp") == first["timestamp"])
    )["_row"].to_list()
    n_keys = conflicts.select(pl.struct(key).n_unique()).item()
    raise ValueError(
        f"events at rows {rows[0]} and {rows[1]} have the same symbol={first['symbol']!r}, "
        f"event_type={first['event_type']!r}, timestamp={first['timestamp']} but differ in other "
        f"columns; fix the input ({n_keys} such conflicting event(s) in total)"
    )


def build_manifest(
    events: pl.DataFrame,
    *,
    start_date: date | None = None,
    end_date: date | None = None,
    before: timedelta = timedelta(minutes=3),
    after: timedelta = timedelta(minutes=7),
) -> tuple[pl.DataFrame, ManifestStats]:
    """Turn a validated events frame into the manifest and its stats.

    Exact duplicate rows are dropped (``duplicates_dropped``) before the optional New York date filter
    ``start_date <= date <= end_date`` (``filtered_out``). Rows that agree on (symbol, event_type,
    timestamp) but differ elsewhere raise ``ValueError``. Output: ``MANIFEST_COLUMNS`` then the extra
    columns in input order, sorted by symbol, timestamp, event_id.
    """
    _check_window(before, after)
    if start_date is not None and end_date is not None and start_date > end_date:
        raise ValueError(f"start_date {start_date} is after end_date {end_date}")
    events = _normalise_input(events)
    extras = [c for c in events.columns if c not in MANIFEST_COLUMNS]

    indexed = events.with_row_index("_row")
    unique = indexed.unique(subset=events.columns, keep="first", maintain_order=True)
    duplicates_dropped = events.height - unique.height
    _raise_on_conflicts(unique)

    if start_date is not None or end_date is not None:
        ny_date = pl.col("timestamp").dt.convert_time_zone(NY_TZ).dt.date()
        keep = pl.lit(True)
        if start_date is not None:
            keep = keep & (ny_date >= start_date)
        if end_date is not None:
            keep = keep & (ny_date <= end_date)
        kept = unique.filter(keep)
    else:
        kept = unique
    filtered_out = unique.height - kept.height

    ts = pl.col("timestamp")
    # A Python timedelta literal is Duration("us"), which would drag the result down to us precision.
    before_ns = pl.lit(before).cast(pl.Duration("ns"))
    after_ns = pl.lit(after).cast(pl.Duration("ns"))
    manifest = (
        kept.with_columns(
            _event_id_expr().alias("event_id"),
            (ts - before_ns).cast(_UTC_NS).alias("ts_start"),
            (ts + after_ns).cast(_UTC_NS).alias("ts_end"),
            _session_expr(ts).alias("session"),
        )
        .select([*MANIFEST_COLUMNS, *extras])
        .sort(["symbol", "timestamp", "event_id"])
    )
    if manifest["event_id"].n_unique() != manifest.height:  # a 32-bit hash collision on the same second
        dup = manifest.filter(pl.col("event_id").is_duplicated())["event_id"][0]
        raise ValueError(f"event_id collision for {dup!r}; events differ only in ways the id cannot show")

    counts = dict(manifest.group_by("session").len().iter_rows())
    stats = ManifestStats(
        events=manifest.height,
        symbols=manifest["symbol"].n_unique(),
        per_session={s: int(counts.get(s, 0)) for s in SESSIONS},
        duplicates_dropped=duplicates_dropped,
        filtered_out=filtered_out,
    )
    return manifest, stats
