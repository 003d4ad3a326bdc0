"""Shape raw ticks into the two stable per-event files (polars only, no Python row loops).

Trades are kept raw. Quotes are sampled on a grid of 1/hz buckets over [ts_start, ts_end): each
bucket's row is the NBBO as known at its right edge (the last quote strictly before it, carried
forward, so no look-ahead) plus the number of raw quotes inside the bucket. Only quotes inside
the window are used, so the output never depends on how the request ranges were merged.
"""

from __future__ import annotations

import numpy as np
import polars as pl

TS = pl.Datetime("ns", "UTC")

# Raw columns as parsed from the API (timestamps still integer nanoseconds).
RAW_TRADES_SCHEMA: dict[str, pl.DataType] = {
    "sip_timestamp": pl.Int64(),
    "participant_timestamp": pl.Int64(),
    "price": pl.Float64(),
    "size": pl.Float64(),
    "exchange": pl.Int32(),
    "tape": pl.Int32(),
    "conditions": pl.List(pl.Int32()),
    "sequence_number": pl.Int64(),
    "id": pl.String(),
    "trf_timestamp": pl.Int64(),
    "trf_id": pl.Int32(),
    "correction": pl.Int32(),
}
NBBO_SCHEMA: dict[str, pl.DataType] = {  # a quote's fields, raw and stored alike
    "bid_price": pl.Float64(),
    "ask_price": pl.Float64(),
    "bid_size": pl.Float64(),
    "ask_size": pl.Float64(),
    "bid_exchange": pl.Int32(),
    "ask_exchange": pl.Int32(),
}
RAW_QUOTES_SCHEMA: dict[str, pl.DataType] = {
    "sip_timestamp": pl.Int64(),
    "participant_timestamp": pl.Int64(),
    **NBBO_SCHEMA,
    "sequence_number": pl.Int64(),
    "tape": pl.Int32(),
    "conditions": pl.List(pl.Int32()),
    "indicators": pl.List(pl.Int32()),
}
RAW_SCHEMAS = {"trades": RAW_TRADES_SCHEMA, "quotes": RAW_QUOTES_SCHEMA}

# The documented, stable on-disk contract: the raw columns, timestamps typed.
TRADES_SCHEMA: dict[str, pl.DataType] = {
    k: (TS if k.endswith("timestamp") else v) for k, v in RAW_TRADES_SCHEMA.items()
}
QUOTES_SCHEMA: dict[str, pl.DataType] = {
    "ts": TS,
    "sip_timestamp": TS,
    **NBBO_SCHEMA,
    "sequence_number": pl.Int64(),
    "quote_count": pl.UInt32(),
}
RAW_QUOTES_OUT_SCHEMA: dict[str, pl.DataType] = {
    k: (TS if k.endswith("timestamp") else v) for k, v in RAW_QUOTES_SCHEMA.items()
}
QUOTE_FIELDS = tuple(NBBO_SCHEMA)


def empty_raw(kind: str) -> pl.DataFrame:
    return pl.DataFrame(schema=RAW_SCHEMAS[kind])


def quotes_schema(hz: float) -> dict[str, pl.DataType]:
    return QUOTES_SCHEMA if hz > 0 else RAW_QUOTES_OUT_SCHEMA


def _keys(raw: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The (sip_timestamp, sequence_number) columns as int64 arrays (zero-copy without nulls)."""
    cols = [raw.get_column(c) for c in ("sip_timestamp", "sequence_number")]
    return tuple(c.fill_null(0).to_numpy() if c.null_count() else c.to_numpy() for c in cols)  # type: ignore[return-value]


def _in_time_order(ts: np.ndarray, seq: np.ndarray) -> bool:
    """True if rows are strictly ordered by (sip_timestamp, sequence_number), as v3 pages are."""
    step = np.diff(ts)
    if (step < 0).any():
        return False
    ties = step == 0
    return not ties.any() or bool((np.diff(seq)[ties] > 0).all())


def _in_window(raw: pl.DataFrame, start_ns: int, end_ns: int) -> tuple[pl.DataFrame, np.ndarray]:
    """The rows with start <= sip_timestamp < end, sorted by (sip_timestamp, sequence_number), and
    their timestamps.

    Pages arrive in time order, so this is normally two binary searches and a zero-copy slice;
    anything out of order is sorted first. A polars query per file would cost more in fixed
    planning than a small-cap event's whole shaping (benchmarks/README.md, decision record D3)."""
    ts, seq = _keys(raw)
    if not _in_time_order(ts, seq):
        raw = raw.sort("sip_timestamp", "sequence_number")
        ts = _keys(raw)[0]
    lo, hi = np.searchsorted(ts, (start_ns, end_ns), side="left")
    return raw.slice(int(lo), int(hi - lo)), ts[lo:hi]


def _typed(
    frame: pl.DataFrame, schema: dict[str, pl.DataType], extra: dict[str, pl.Series] | None = None
) -> pl.DataFrame:
    """Cast to the on-disk schema (integer nanoseconds become UTC datetimes), column by column;
    ``extra`` supplies columns the frame does not have."""
    extra = extra or {}
    cols = (extra[c] if c in extra else frame.get_column(c) for c in schema)
    return pl.DataFrame([col.cast(t) for col, t in zip(cols, schema.values(), strict=True)])


def shape_trades(raw: pl.DataFrame, start_ns: int, end_ns: int) -> pl.DataFrame:
    """Every trade with start <= sip_timestamp < end, sorted by (sip_timestamp, sequence_number)."""
    return _typed(_in_window(raw, start_ns, end_ns)[0], TRADES_SCHEMA)


def shape_quotes(raw: pl.DataFrame, start_ns: int, end_ns: int, hz: float) -> pl.DataFrame:
    """Quotes sampled at `hz` (0 = raw quotes inside the window).

    Bucket k is [start + k*w, start + (k+1)*w) clipped to the window; ``pos[k]`` is the number of
    quotes before its left edge (a binary search of the sorted timestamps), so the bucket holds
    ``pos[k+1] - pos[k]`` quotes and the NBBO known at its right edge is quote ``pos[k+1] - 1``.
    That is an as-of join with ``allow_exact_matches=False`` plus a count per bucket, without the
    join's fixed cost per event (decision record D3; the join is the oracle in the tests).
    """
    inside, ts = _in_window(raw, start_ns, end_ns)
    if hz <= 0:
        return _typed(inside, RAW_QUOTES_OUT_SCHEMA)
    width = round(1_000_000_000 / hz)
    if width <= 0:
        raise ValueError(f"SMALLCAPS_QUOTES_HZ={hz} is too high: bucket width must be >= 1 ns")
    buckets = -(-(end_ns - start_ns) // width)  # ceil
    edges = np.minimum(start_ns + np.arange(buckets + 1, dtype=np.int64) * width, end_ns)
    pos = np.searchsorted(ts, edges, side="left")
    known = pos[1:] > 0  # buckets before the first quote have no NBBO yet
    return _typed(inside.gather(pos[1:][known] - 1), QUOTES_SCHEMA, {
        "ts": pl.Series("ts", edges[1:][known]),
        "quote_count": pl.Series("quote_count", np.diff(pos)[known], dtype=pl.UInt32),
    })
