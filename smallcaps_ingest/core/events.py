"""Read and validate the events input (one row per intraday market event).

The events file is user supplied and everything downstream (event ids, partition paths, API calls)
is derived from it, so it is checked strictly here, once, with messages that name the column, the
0-based row in the file and the offending value. Reading never writes anything.

Expected schema: ``symbol`` (String), ``event_type`` (String), ``timestamp`` (Datetime with a time
zone, any unit). Extra columns are carried through untouched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import polars as pl

__all__ = [
    "EVENT_TYPE_MAX_LEN",
    "EVENT_TYPE_RE",
    "REQUIRED_COLUMNS",
    "RESERVED_COLUMNS",
    "SYMBOL_RE",
    "EventsValidationError",
    "check_event_types",
    "read_events",
    "validate_events",
]


class EventsValidationError(ValueError):
    """The events input is unusable; the message names the column, row (0-based) and value."""


SYMBOL_RE = re.compile(r"^[A-Z][A-Z0-9.-]{0,9}$")
# Event types go into event ids (and so directory names) exactly as written, as the users' old system
# wrote them (``AAL_vwap_break_20230907_151600_1a2b3c4d``): letters, digits and '_' only, path-safe.
EVENT_TYPE_MAX_LEN = 40
EVENT_TYPE_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_]{{0,{EVENT_TYPE_MAX_LEN - 1}}}$")
REQUIRED_COLUMNS: tuple[str, ...] = ("symbol", "event_type", "timestamp")
# Columns the manifest adds; an events file carrying them would collide with the manifest output.
RESERVED_COLUMNS: tuple[str, ...] = ("event_id", "ts_start", "ts_end", "session")

_MANIFEST_MARKERS = frozenset({"event_id", "ts_start", "ts_end"})
_TICK_MARKERS = frozenset(
    {
        "sip_timestamp",
        "participant_timestamp",
        "trf_timestamp",
        "sequence_number",
        "bid_price",
        "ask_price",
        "bid_size",
        "ask_size",
        "bid_exchange",
        "ask_exchange",
        "conditions",
    }
)
_PARQUET_MAGIC = b"PAR1"
# Datetime("ns") holds int64 nanoseconds since the epoch: roughly 1677-09-21 .. 2262-04-11.
_NS_MIN_YEAR, _NS_MAX_YEAR = 1678, 2261


def read_events(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read an events Parquet file and validate it (see ``validate_events``); never writes."""
    p = Path(path)
    if not p.exists():
        raise EventsValidationError(f"{p}: events file does not exist")
    if not p.is_file():
        raise EventsValidationError(f"{p}: is not a file (expected an events Parquet file)")
    _check_parquet_magic(p)
    try:
        df = pl.read_parquet(p)
    except Exception as exc:  # polars raises several error types for corrupt files
        raise EventsValidationError(f"{p} is not a readable Parquet file: {exc}") from exc
    return validate_events(df, source=str(p))


def validate_events(df: pl.DataFrame, source: str = "events") -> pl.DataFrame:
    """Check an events frame and return it with ``timestamp`` cast to Datetime("ns", "UTC").

    Raises ``EventsValidationError`` for the first problem found (in the order: columns, dtypes,
    empty, nulls, values); when several rows share that problem the message says how many.
    """
    _check_columns(df, source)
    _check_dtypes(df, source)
    if df.height == 0:
        raise EventsValidationError(f"{source}: has no rows (an events file needs at least one event)")
    _check_nulls(df, source)
    _check_timestamp_range(df, source)
    _check_symbols(df, source)
    check_event_types(df, source)
    return df.with_columns(
        pl.col("timestamp").dt.convert_time_zone("UTC").dt.cast_time_unit("ns").alias("timestamp")
    )


def _check_parquet_magic(p: Path) -> None:
    """Parquet files start and end with b"PAR1"; checking first gives a clearer error than polars'."""
    size = p.stat().st_size
    with p.open("rb") as fh:
        head = fh.read(512)
        tail = b""
        if size >= 8:
            fh.seek(size - 4)
            tail = fh.read(4)
    if head[:4] == _PARQUET_MAGIC and tail == _PARQUET_MAGIC:
        return
    hint = ""
    if size == 0:
        hint = " (the file is empty)"
    elif head.lstrip()[:1] in (b"{", b"["):
        hint = " (it looks like JSON)"
    else:
        try:
            first_line = head.decode("utf-8").splitlines()[0]
        except (UnicodeDecodeError, IndexError):
            first_line = ""
        if first_line and ("," in first_line or "\t" in first_line):
            hint = f" (it looks like CSV/text; first line: {first_line[:80]!r})"
    raise EventsValidationError(f"{p} is not a Parquet file{hint}")


def _check_columns(df: pl.DataFrame, source: str) -> None:
    cols = set(df.columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    looks_like = ""
    if _MANIFEST_MARKERS.issubset(cols):
        looks_like = "this looks like a manifest, not an events file"
    elif cols & _TICK_MARKERS:
        looks_like = "this looks like trades/quotes output, not an events file"
    if missing:
        msg = f"{source}: missing required column(s) {missing}; columns found: {df.columns}"
        if looks_like:
            msg += f"; {looks_like}"
        raise EventsValidationError(msg)
    if looks_like.startswith("this looks like a manifest"):
        raise EventsValidationError(
            f"{source}: {looks_like} (it has columns {sorted(_MANIFEST_MARKERS)}); pass the events file"
        )
    reserved = [c for c in RESERVED_COLUMNS if c in cols]
    if reserved:
        raise EventsValidationError(
            f"{source}: column(s) {reserved} are reserved for the manifest output; rename them"
        )


def _check_dtypes(df: pl.DataFrame, source: str) -> None:
    for col in ("symbol", "event_type"):
        dtype = df.schema[col]
        if dtype == pl.Null:
            raise EventsValidationError(f"{source}: column '{col}' has only nulls ({df.height} rows)")
        if dtype != pl.String:
            raise EventsValidationError(f"{source}: column '{col}' must be String, got {dtype}")
    dtype = df.schema["timestamp"]
    if dtype == pl.Null:
        raise EventsValidationError(f"{source}: column 'timestamp' has only nulls ({df.height} rows)")
    if dtype == pl.String:
        first = df["timestamp"].drop_nulls().head(1).to_list()
        shown = repr(first[0]) if first else "<all null>"
        raise EventsValidationError(
            f"{source}: column 'timestamp' is a string (first value: {shown}); "
            "expected a Datetime with a time zone"
        )
    if not isinstance(dtype, pl.Datetime):
        raise EventsValidationError(
            f"{source}: column 'timestamp' must be a Datetime with a time zone, got {dtype}"
        )
    if dtype.time_zone is None:
        raise EventsValidationError(
            f"{source}: column 'timestamp' has no time zone ({dtype}); event times are ambiguous "
            "without one, e.g. write them as Datetime(time_zone='America/New_York')"
        )


def _first_bad(df: pl.DataFrame, mask: pl.Expr, col: str) -> tuple[int, object, int] | None:
    """(first row index, its value, number of bad rows) for rows where ``mask`` holds, or None."""
    bad = df.select(pl.col(col), mask.alias("_bad")).with_row_index("_row").filter(pl.col("_bad"))
    if bad.height == 0:
        return None
    return int(bad["_row"][0]), bad[col][0], bad.height


def _others(count: int) -> str:
    return f" ({count - 1} more row(s) with the same problem)" if count > 1 else ""


def _check_nulls(df: pl.DataFrame, source: str) -> None:
    for col in REQUIRED_COLUMNS:
        found = _first_bad(df, pl.col(col).is_null(), col)
        if found is not None:
            row, _, count = found
            raise EventsValidationError(
                f"{source}: column '{col}' has {count} null value(s); first at row {row}"
            )


def _check_timestamp_range(df: pl.DataFrame, source: str) -> None:
    """Reject timestamps that cannot be represented as int64 nanoseconds (silent overflow otherwise)."""
    year = pl.col("timestamp").dt.convert_time_zone("UTC").dt.year()
    _reject_first(
        df, (year < _NS_MIN_YEAR) | (year > _NS_MAX_YEAR), "timestamp", source,
        lambda v: f"value {v} is out of range (years {_NS_MIN_YEAR}..{_NS_MAX_YEAR})",
    )


def _reject_first(
    df: pl.DataFrame, bad: pl.Expr, col: str, source: str, describe: Callable[[object], str]
) -> None:
    """Raise naming the first row where ``bad`` holds, its value and how many others there are."""
    found = _first_bad(df, bad, col)
    if found is not None:
        row, value, count = found
        where = f"{source}: column '{col}', row {row}"
        raise EventsValidationError(f"{where}: {describe(value)}{_others(count)}")


def _symbol_problem(value: str) -> str:
    """Human reason why ``value`` is not an acceptable symbol (only called for bad values)."""
    if value == "":
        return "it is empty"
    if value != value.strip() or any(ch.isspace() for ch in value):
        return "it contains whitespace"
    if "/" in value or "\\" in value or ".." in value:
        return "it contains path characters ('/', '\\' or '..')"
    if any(ch.islower() for ch in value):
        return "it has lowercase letters (symbols must be upper case, e.g. 'BRK.B')"
    if len(value) > 10:
        return f"it is too long ({len(value)} characters, at most 10)"
    if not ("A" <= value[0] <= "Z"):
        return "it must start with a letter A-Z"
    if value.endswith("."):
        return "it must not end with '.'"
    bad = sorted({ch for ch in value if not (ch.isascii() and (ch.isalnum() or ch in ".-"))})
    return f"it contains characters outside A-Z 0-9 '.' '-': {bad}"


def _check_symbols(df: pl.DataFrame, source: str) -> None:
    sym = pl.col("symbol")
    # SYMBOL_RE allows '.', so '..' (parent directory) and a trailing '.' are rejected separately.
    bad_mask = (
        ~sym.str.contains(SYMBOL_RE.pattern) | sym.str.contains("..", literal=True) | sym.str.ends_with(".")
    )
    _reject_first(
        df, bad_mask, "symbol", source, lambda v: f"invalid symbol {v!r}: {_symbol_problem(str(v))}"
    )


def _event_type_problem(value: str) -> str:
    """Human reason why ``value`` is not an acceptable event type (only called for bad values)."""
    if value == "":
        return "it is empty"
    if len(value) > EVENT_TYPE_MAX_LEN:
        return f"it is too long ({len(value)} characters, at most {EVENT_TYPE_MAX_LEN})"
    bad = sorted({ch for ch in value if not (ch.isascii() and (ch.isalnum() or ch == "_"))})
    if bad:
        return f"it contains characters outside [A-Za-z0-9_]: {bad}"
    return "it must start with a letter or digit"


def check_event_types(df: pl.DataFrame, source: str) -> None:
    """Every ``event_type`` matches ``EVENT_TYPE_RE`` (it is written into event ids as given)."""
    _reject_first(
        df, ~pl.col("event_type").str.contains(EVENT_TYPE_RE.pattern), "event_type", source,
        lambda v: f"invalid event_type {v!r}: {_event_type_problem(str(v))} "
        f"(event types must match {EVENT_TYPE_RE.pattern})",
    )
