"""Checks on one symbol's event windows, computed from disk (no request is ever made).

ERROR checks guard completeness (partial events, manifest events missing, ``.tmp`` orphans);
WARN checks guard data quality (timestamps inside the window, sort order, unique sequence
numbers, the share of quotes with bid <= ask, and the documented schema).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

from smallcaps_ingest import layout, storage
from smallcaps_ingest.core import shape, store
from smallcaps_ingest.core.plan import Window

_EVENT_ID = layout.EVENT_PREFIX + r"([^/\\]+)"  # the event id in a data file's path

BID_LE_ASK_MIN_SHARE = 0.98
# sampling error allowed around that share, in standard deviations of a binomial count
BID_LE_ASK_SIGMAS = 3.0
EXAMPLES = 5  # offending examples shown per check
S3_NO_TMP = ("passes trivially on S3: an object is written by one atomic PUT, never through a "
             "temporary object")


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    severity: str  # "ERROR" | "WARN"
    description: str
    metadata: dict[str, object] = field(default_factory=dict)


ERROR_CHECKS = ("no_partial_events", "no_missing_events", "no_tmp_orphans")
WARN_CHECKS = (
    "timestamps_in_window",
    "rows_sorted",
    "sequence_unique",
    "quotes_bid_le_ask",
    "schema_as_documented",
)
CHECK_DESCRIPTIONS = {
    "no_partial_events": "Every event directory holds both trades.parquet and quotes.parquet, or neither.",
    "no_missing_events": "Every manifest event of the symbol is complete on disk.",
    "no_tmp_orphans": "No *.tmp* file is left in the partition (an interrupted write). On S3 it passes "
    "trivially: an object is written by one atomic PUT, never through a temporary object.",
    "timestamps_in_window": "Every trade and sampled quote lies inside its event window [ts_start, ts_end).",
    "rows_sorted": "Trades are sorted by (sip_timestamp, sequence_number); quotes by ts.",
    "sequence_unique": (
        "sequence_number is unique within each trades file. A WARN for inspection only: the tape has "
        "genuine duplicate sequence numbers and trades identical in every field, and every one is kept."
    ),
    "quotes_bid_le_ask": (
        f"At least {BID_LE_ASK_MIN_SHARE:.0%} of the distinct quotes have bid_price <= ask_price, within "
        f"{BID_LE_ASK_SIGMAS:g} standard deviations of sampling error."
    ),
    "schema_as_documented": "Both files carry exactly the documented columns and types.",
}


def _result(name: str, bad: Sequence[object], total: int, **extra: object) -> CheckOutcome:
    severity = "ERROR" if name in ERROR_CHECKS else "WARN"
    meta: dict[str, object] = {"failing": len(bad), "checked": total, **extra}
    if bad:
        meta["examples"] = ", ".join(str(b) for b in list(bad)[:EXAMPLES])
    return CheckOutcome(name, not bad, severity, CHECK_DESCRIPTIONS[name], meta)


def crossed_allowance(quotes: int) -> float:
    """Crossed quotes (bid > ask) tolerated among ``quotes`` distinct ones.

    ``1 - BID_LE_ASK_MIN_SHARE`` of them plus ``BID_LE_ASK_SIGMAS`` binomial standard deviations:
    real NBBO feeds show locked and crossed markets, and one crossed quote in a 45-second window of
    a quiet name is 2-5 % of its quotes, which a flat share flagged as bad data (99 of 1,600 symbols
    in benchmarks/backfill_bench.py). On a symbol's whole history the allowance tends to the share.
    """
    p = 1.0 - BID_LE_ASK_MIN_SHARE
    return quotes * p + BID_LE_ASK_SIGMAS * math.sqrt(quotes * p * (1.0 - p))


def _duplicate_figures(trades: pl.DataFrame) -> dict[str, object]:
    """What ``sequence_unique`` shows of the duplicates (trades of the offending events, with
    ``event_id``): rows beyond the first of each (event, sequence_number), how many of those are
    identical in every field to an earlier row, and a few of the repeated numbers."""
    fields = [c for c in shape.TRADES_SCHEMA if c in trades.columns]
    repeated = (
        trades.group_by("event_id", "sequence_number")
        .agg(n=pl.len(), distinct=pl.struct(fields).n_unique())
        .filter(pl.col("n") > 1)
        .sort("event_id", "sequence_number")
    )
    examples = [
        f"{e} sequence_number {q}: {n} rows, {d} distinct"
        for e, q, n, d in repeated.head(EXAMPLES).iter_rows()
    ]
    return {
        "duplicate_rows": int((repeated["n"] - 1).sum()),
        "identical_rows": int((repeated["n"] - repeated["distinct"]).sum()),
        "duplicate_examples": "; ".join(examples),
    }


def _read_all(files: list[str], blobs: dict[str, bytes] | None = None) -> pl.DataFrame | None:
    """The files as one frame with a ``path`` column; ``blobs``: their bytes (the tree on S3)."""
    if not files:
        return None
    if blobs is None:
        return pl.read_parquet(files, include_file_paths="path", missing_columns="insert")
    frames = [pl.read_parquet(io.BytesIO(blobs[f])).with_columns(path=pl.lit(f)) for f in files]
    return pl.concat(frames, how="diagonal")


def evaluate_symbol(
    data_dir: str | os.PathLike[str], symbol: str, windows: Sequence[Window], hz: float
) -> list[CheckOutcome]:
    """All eight checks for one symbol (partition)."""
    scan = store.scan_symbol(data_dir, symbol)
    expected = {w.event_id for w in windows}
    out = [
        _result("no_partial_events", sorted(scan.partial), len(scan.complete) + len(scan.partial)),
        _result("no_missing_events", sorted(expected - scan.complete), len(expected)),
        _result("no_tmp_orphans", [p.name for p in scan.orphans], len(scan.complete),
                **({"note": S3_NO_TMP} if storage.is_remote(data_dir) else {})),
    ]
    root = store.symbol_dir(data_dir, symbol)
    events = sorted(scan.complete)
    trade_files = [str(store.event_dir(data_dir, symbol, e) / layout.FILES[0]) for e in events]
    quote_files = [str(store.event_dir(data_dir, symbol, e) / layout.FILES[1]) for e in events]

    # S3: every object fetched once, concurrently (no footer-only read pays off on small files)
    blobs = storage.read_many(trade_files + quote_files) if storage.is_remote(root) else None

    # schema: metadata only, per file
    want_q = shape.quotes_schema(hz)
    bad_schema = [
        f
        for f, want in [*((f, shape.TRADES_SCHEMA) for f in trade_files), *((f, want_q) for f in quote_files)]
        if dict(pl.read_parquet_schema(io.BytesIO(blobs[f]) if blobs is not None else f)) != want
    ]
    bounds = pl.DataFrame(
        {
            "event_id": [w.event_id for w in windows],
            "s": [w.start_ns for w in windows],
            "e": [w.end_ns for w in windows],
        },
        schema={"event_id": pl.String, "s": pl.Int64, "e": pl.Int64},
    )
    bad_window: list[str] = []
    bad_sort: list[str] = []
    bad_seq: list[str] = []
    seq_figures: dict[str, object] = {"duplicate_rows": 0, "identical_rows": 0}
    quotes_rows = distinct = crossed = 0
    trades = _read_all([f for f in trade_files if f not in bad_schema], blobs)
    if trades is not None and trades.height:
        t = trades.with_columns(
            event_id=pl.col("path").str.extract(_EVENT_ID),
            ns=pl.col("sip_timestamp").dt.epoch("ns"),
        ).join(bounds, on="event_id", how="left")
        per = t.group_by("event_id").agg(
            outside=(
                (pl.col("ns") < pl.col("s")) | (pl.col("ns") >= pl.col("e")) | pl.col("s").is_null()
            ).sum(),
            unsorted=(
                (pl.col("ns").diff() < 0)
                | ((pl.col("ns").diff() == 0) & (pl.col("sequence_number").diff() < 0))
            ).sum(),
            dup=pl.len() - pl.col("sequence_number").n_unique(),
        )
        bad_window += per.filter(pl.col("outside") > 0)["event_id"].to_list()
        bad_sort += per.filter(pl.col("unsorted") > 0)["event_id"].to_list()
        bad_seq += per.filter(pl.col("dup") > 0)["event_id"].to_list()
        if bad_seq:
            seq_figures = _duplicate_figures(t.filter(pl.col("event_id").is_in(bad_seq)))
    quotes = _read_all([f for f in quote_files if f not in bad_schema], blobs)
    if quotes is not None and quotes.height:
        key = "ts" if hz > 0 else "sip_timestamp"
        q = quotes.with_columns(
            event_id=pl.col("path").str.extract(_EVENT_ID),
            ns=pl.col(key).dt.epoch("ns"),
            sip=pl.col("sip_timestamp").dt.epoch("ns"),
        ).join(bounds, on="event_id", how="left")
        # sampled rows: ts in (start, end], the carried quote in [start, ts); raw rows: [start, end)
        if hz > 0:
            outside = (
                (pl.col("ns") <= pl.col("s"))
                | (pl.col("ns") > pl.col("e"))
                | (pl.col("sip") < pl.col("s"))
                | (pl.col("sip") >= pl.col("ns"))
            )
        else:
            outside = (pl.col("ns") < pl.col("s")) | (pl.col("ns") >= pl.col("e"))
        per = q.group_by("event_id").agg(
            outside=(outside | pl.col("s").is_null()).sum(),
            unsorted=(pl.col("ns").diff() < 0).sum(),
        )
        bad_window += per.filter(pl.col("outside") > 0)["event_id"].to_list()
        bad_sort += per.filter(pl.col("unsorted") > 0)["event_id"].to_list()
        # a 1 Hz row carries the last quote forward through quiet seconds: judge each quote once
        quote = pl.struct("event_id", "sequence_number")
        quotes_rows = q.height
        distinct, crossed = q.select(
            quote.n_unique().alias("distinct"),
            quote.filter(pl.col("bid_price") > pl.col("ask_price")).n_unique().alias("crossed"),
        ).row(0)
    allowed = crossed_allowance(distinct)
    share = 1.0 - crossed / distinct if distinct else 1.0
    out += [
        _result("timestamps_in_window", sorted(set(bad_window)), len(events)),
        _result("rows_sorted", sorted(set(bad_sort)), len(events)),
        _result("sequence_unique", sorted(set(bad_seq)), len(events), **seq_figures),
        CheckOutcome(
            "quotes_bid_le_ask",
            crossed <= allowed,
            "WARN",
            CHECK_DESCRIPTIONS["quotes_bid_le_ask"],
            {
                "share": round(share, 6),
                "distinct_quotes": distinct,
                "crossed": crossed,
                "crossed_allowed": math.floor(allowed),
                "quote_rows": quotes_rows,
                "min_share": BID_LE_ASK_MIN_SHARE,
            },
        ),
        _result("schema_as_documented", [f[len(str(root)) + 1:] for f in bad_schema], len(events) * 2),
    ]
    return out
