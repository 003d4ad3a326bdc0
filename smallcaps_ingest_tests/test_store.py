"""The files an event leaves on disk: exact round trip, and how they are encoded."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from smallcaps_ingest import shape, store
from smallcaps_ingest_tests.conftest import ns

START = ns("2024-03-18T14:00:00")
END = START + 600 * 1_000_000_000
DELTA = "DELTA_BINARY_PACKED"


def _raw(kind: str, n: int, seed: int) -> pl.DataFrame:
    """``n`` raw ticks in time order over the window, with nulls where the API leaves fields out."""
    rng = random.Random(seed)
    sip = sorted(rng.randrange(START - 10**9, END + 10**9) for _ in range(n))
    seq = list(range(5_000_000, 5_000_000 + n))
    some = [rng.random() < 0.3 for _ in range(n)]
    if kind == "trades":
        cols: dict[str, list] = {
            "sip_timestamp": sip, "participant_timestamp": [t - rng.randrange(10**6) for t in sip],
            "price": [round(rng.uniform(2, 3), 4) for _ in range(n)],
            "size": [float(rng.choice((1, 100, 250))) for _ in range(n)],
            "exchange": [rng.randrange(1, 20) for _ in range(n)], "tape": [1] * n,
            "conditions": [[12, 37] if s else None for s in some], "sequence_number": seq,
            "id": [str(10_000 + i) for i in range(n)],
            "trf_timestamp": [t - 5 if s else None for t, s in zip(sip, some, strict=True)],
            "trf_id": [201 if s else None for s in some], "correction": [None] * n,
        }
    else:
        bid = [round(rng.uniform(2, 3), 2) for _ in range(n)]
        cols = {
            "sip_timestamp": sip, "participant_timestamp": [t - 1000 for t in sip],
            "bid_price": bid, "ask_price": [b + 0.01 for b in bid],
            "bid_size": [float(rng.randrange(1, 50)) for _ in range(n)],
            "ask_size": [float(rng.randrange(1, 50)) for _ in range(n)],
            "bid_exchange": [rng.randrange(1, 20) for _ in range(n)],
            "ask_exchange": [rng.randrange(1, 20) for _ in range(n)],
            "sequence_number": seq, "tape": [1] * n, "conditions": [None] * n, "indicators": [None] * n,
        }
    return pl.DataFrame(cols, schema=shape.RAW_SCHEMAS[kind])


def test_event_files_round_trip_exactly_with_delta_encoded_64_bit_columns(tmp_path: Path) -> None:
    trades = shape.shape_trades(_raw("trades", 3000, 1), START, END)
    quotes = shape.shape_quotes(_raw("quotes", 9000, 2), START, END, 1.0)
    assert trades.height > 2500 and quotes.height == 600
    size = store.write_event(tmp_path, "AAOI", "AAOI_1", trades, quotes)
    d = store.event_dir(tmp_path, "AAOI", "AAOI_1")
    assert sorted(p.name for p in d.iterdir()) == ["quotes.parquet", "trades.parquet"]  # no .tmp left
    assert size == sum(p.stat().st_size for p in d.iterdir())

    for name, frame in (("trades", trades), ("quotes", quotes)):
        path = d / f"{name}.parquet"
        back = pl.read_parquet(path)
        assert back.schema == frame.schema and back.equals(frame), name
        meta = pq.ParquetFile(path).metadata
        assert meta.num_rows == frame.height and meta.num_row_groups == 1
        group = meta.row_group(0)
        for i in range(group.num_columns):
            col = group.column(i)
            top = col.path_in_schema.split(".")[0]
            wide = frame.schema[top] in (pl.Int64(), shape.TS)
            assert (DELTA in col.encodings) is wide, (name, col.path_in_schema, col.encodings)
            assert "RLE_DICTIONARY" not in col.encodings and "PLAIN_DICTIONARY" not in col.encodings
            assert col.compression == "ZSTD"
            assert col.is_stats_set, (name, col.path_in_schema)
        # statistics a reader can prune on: the first column's range is the frame's
        stats = group.column(0).statistics
        stamps = frame.get_column(frame.columns[0]).dt.epoch("ns")
        assert (stats.min_raw, stats.max_raw) == (stamps.min(), stamps.max())


def test_delta_encoding_makes_smaller_files_than_plain(tmp_path: Path) -> None:
    """Why the 64-bit columns are delta-encoded: rising timestamps and sequence numbers shrink."""
    trades = shape.shape_trades(_raw("trades", 3000, 3), START, END)
    plain = tmp_path / "plain.parquet"
    # the encoding used before (plain, zstd level 3)
    pq.write_table(trades.to_arrow(), plain, compression="zstd", compression_level=3, use_dictionary=False)
    ours = tmp_path / "ours.parquet"
    store.atomic_write_parquet(trades, ours)
    assert pl.read_parquet(ours).equals(pl.read_parquet(plain))
    assert ours.stat().st_size < 0.95 * plain.stat().st_size, (ours.stat().st_size, plain.stat().st_size)


def test_empty_and_all_null_frames_are_written(tmp_path: Path) -> None:
    empty = pl.DataFrame(schema=shape.TRADES_SCHEMA)
    nulls = pl.DataFrame({k: [None, None] for k in shape.TRADES_SCHEMA}, schema=shape.TRADES_SCHEMA)
    for name, frame in (("empty", empty), ("nulls", nulls)):
        path = tmp_path / f"{name}.parquet"
        store.atomic_write_parquet(frame, path)
        back = pl.read_parquet(path)
        assert back.schema == frame.schema and back.equals(frame), name
