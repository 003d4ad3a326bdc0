"""The files an event leaves on disk: exact round trip, and how they are encoded."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smallcaps_ingest.core import shape, store
from smallcaps_ingest_tests.conftest import ns, truth_frame

START = ns("2024-03-18T14:00:00")
END = START + 600 * 1_000_000_000
DELTA = "DELTA_BINARY_PACKED"


def test_event_files_round_trip_exactly_with_delta_encoded_64_bit_columns(tmp_path: Path) -> None:
    trades = shape.shape_trades(truth_frame("trades", "AAOI", START, END), START, END)
    quotes = shape.shape_quotes(truth_frame("quotes", "AAOI", START, END), START, END, 1.0)
    assert trades.height == 1211 and quotes.height == 600
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
        # no ARROW:schema footer entry (~1 KB per file): Parquet's logical types carry the types,
        # so another reader (pyarrow here) sees UTC nanosecond timestamps and unsigned counts too
        assert meta.metadata is None or b"ARROW:schema" not in meta.metadata
        arrow = pq.read_table(path).schema
        assert arrow.field(frame.columns[0]).type == pa.timestamp("ns", tz="UTC")
        if name == "quotes":
            assert arrow.field("quote_count").type == pa.uint32()
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
    trades = shape.shape_trades(truth_frame("trades", "HVY", START, END), START, END)
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


def test_directory_fsync_falls_back_where_a_directory_cannot_be_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows cannot open a directory (PermissionError): the write still lands, atomically."""
    import os

    real_open = os.open
    refused: list[str] = []

    def no_dirs(path, flags, *a, **kw):  # type: ignore[no-untyped-def]
        if os.path.isdir(path):
            refused.append(str(path))
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(store.os, "open", no_dirs)
    size = store.write_event(tmp_path, "AAA", "AAA_1", pl.DataFrame({"a": [1]}), pl.DataFrame({"b": [2]}))
    d = store.event_dir(tmp_path, "AAA", "AAA_1")
    assert refused == [str(d)] and size == sum(p.stat().st_size for p in d.iterdir())
    assert sorted(p.name for p in d.iterdir()) == ["quotes.parquet", "trades.parquet"]
    store.atomic_write_bytes(b"x", tmp_path / "one.bin")
    assert (tmp_path / "one.bin").read_bytes() == b"x" and len(refused) == 2


def test_scan_symbol_is_the_layout_scanner(tmp_path: Path) -> None:
    """The store's verdicts come from the tree's one scanner: complete, partial, orphans, sizes."""
    from smallcaps_ingest import layout

    store.write_event(tmp_path, "AAA", "E1", pl.DataFrame({"a": [1]}), pl.DataFrame({"b": [2]}))
    store.atomic_write_bytes(b"t", store.event_dir(tmp_path, "AAA", "E2") / layout.FILES[0])
    (store.event_dir(tmp_path, "AAA", "E2") / "quotes.parquet.tmp.1.2").write_bytes(b"half")
    (store.symbol_dir(tmp_path, "AAA") / "x.tmp.3").write_bytes(b"")
    s = store.scan_symbol(tmp_path, "AAA")
    assert (s.complete, s.partial) == ({"E1"}, {"E2"})
    assert sorted(p.name for p in s.orphans) == ["quotes.parquet.tmp.1.2", "x.tmp.3"]
    assert s.files == 3 and s.bytes == sum(
        p.stat().st_size for d in ("E1", "E2") for p in store.event_dir(tmp_path, "AAA", d).iterdir()
        if p.name in layout.FILES
    )
    assert list(store.iter_symbols(tmp_path)) == ["AAA"]
