"""The on-disk tree: ``event_windows/symbol=SYM/event=EVENT_ID/{trades,quotes}.parquet``.

Every file is written to a temporary file in its own directory, fsynced, then moved into place
with ``os.replace`` (and the directory fsynced), so a reader or a crash never sees half a file.
An event is complete when both files exist; one file alone is a partial event.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

FILES = ("trades.parquet", "quotes.parquet")
TMP_MARK = ".tmp"
SOURCE_FILE = "_source.json"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SourceMismatchError(RuntimeError):
    """Simulated data must never mix into a tree fetched from the real API (or vice versa)."""


def windows_root(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "event_windows"


def _safe(part: str, what: str) -> str:
    if not _SAFE.match(part) or ".." in part:
        raise ValueError(f"unsafe {what} for a path component: {part!r}")
    return part


def symbol_dir(data_dir: str | os.PathLike[str], symbol: str) -> Path:
    return windows_root(data_dir) / f"symbol={_safe(symbol, 'symbol')}"


def event_dir(data_dir: str | os.PathLike[str], symbol: str, event_id: str) -> Path:
    return symbol_dir(data_dir, symbol) / f"event={_safe(event_id, 'event_id')}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _delta_columns(schema: pa.Schema) -> dict[str, str]:
    """64-bit integer and timestamp columns: DELTA_BINARY_PACKED (the rest stays plain).

    Timestamps and sequence numbers rise steadily within an event, so their deltas are small and
    zstd gets a fraction of the bytes to compress: files 16-19 % smaller and encoding 8-19 %
    cheaper than plain zstd level 3 on small-cap and dense events (benchmarks/README.md)."""
    return {f.name: "DELTA_BINARY_PACKED" for f in schema
            if pa.types.is_int64(f.type) or pa.types.is_timestamp(f.type)}


def encode_parquet(
    df: pl.DataFrame, *, row_group_size: int | None = None, dictionary: bool | list[str] = False
) -> pa.Buffer:
    """The file's bytes: zstd (level 1), delta-encoded 64-bit columns, min/max statistics.

    pyarrow without dictionary pages, not polars' writer: an event's files are small (hundreds
    to a few thousand rows), where per-column fixed costs dominate; this took ~0.5 ms of CPU per
    file against ~0.7 and came out smaller (benchmarks/cost_per_tick.py). After delta encoding
    zstd level 3 is no smaller than level 1 (3.74 against 3.73 MB for 300 small-cap files).

    No ``ARROW:schema`` footer entry: Parquet's own logical types already carry every column's
    type (UTC nanosecond timestamps, unsigned counts, lists), and polars, pyarrow and DuckDB read
    the same frame back without it; it was ~1 KB of base64 in a ~12 KB small-cap file (8 %).

    ``row_group_size`` and ``dictionary`` (columns to dictionary-encode) are for the large
    compacted files (``compact.py``): small row groups let a filter skip most of a file, and the
    event columns repeat on every row of an event."""
    table = df.to_arrow()
    sink = pa.BufferOutputStream()
    delta = {k: v for k, v in _delta_columns(table.schema).items()
             if dictionary is not True and k not in (dictionary or ())}
    pq.write_table(table, sink, compression="zstd", compression_level=1, use_dictionary=dictionary,
                   column_encoding=delta, store_schema=False, row_group_size=row_group_size)
    return sink.getvalue()


def atomic_write_bytes(data: bytes | pa.Buffer, dest: Path, sync_dir: bool = True) -> int:
    """Write ``data`` to ``dest`` atomically (temporary file in the same directory, one write,
    fsync, ``os.replace``, then the directory fsynced); returns the bytes written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}{TMP_MARK}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)  # type: ignore[arg-type]  # a pa.Buffer supports the buffer protocol
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(dest.parent)
    return len(memoryview(data))  # type: ignore[arg-type]


def atomic_write_parquet(df: pl.DataFrame, dest: Path, sync_dir: bool = True, **encoding: object) -> int:
    """Write `df` to `dest` atomically; returns the bytes written.

    The file is encoded in memory first, so a frame that cannot be written leaves no file at all,
    and the temporary file gets one write and one fsync before the rename. ``encoding`` goes to
    ``encode_parquet``."""
    return atomic_write_bytes(encode_parquet(df, **encoding), dest, sync_dir)  # type: ignore[arg-type]


def write_event(
    data_dir: str | os.PathLike[str], symbol: str, event_id: str, trades: pl.DataFrame, quotes: pl.DataFrame
) -> int:
    """Write both files of one event (quotes last: its presence marks the event complete)."""
    d = event_dir(data_dir, symbol, event_id)
    size = atomic_write_parquet(trades, d / FILES[0], sync_dir=False)
    size += atomic_write_parquet(quotes, d / FILES[1], sync_dir=False)
    fsync_dir(d)  # one directory sync makes both renames durable
    return size


@dataclass(frozen=True)
class SymbolScan:
    complete: frozenset[str]
    partial: frozenset[str]
    orphans: tuple[Path, ...]
    files: int
    bytes: int


def scan_symbol(data_dir: str | os.PathLike[str], symbol: str) -> SymbolScan:
    """One cheap ``os.scandir`` pass over a symbol's events."""
    complete: set[str] = set()
    partial: set[str] = set()
    orphans: list[Path] = []
    files = size = 0
    root = symbol_dir(data_dir, symbol)
    if not root.is_dir():
        return SymbolScan(frozenset(), frozenset(), (), 0, 0)
    with os.scandir(root) as events:
        for ev in events:
            if not ev.is_dir() or not ev.name.startswith("event="):
                if TMP_MARK in ev.name:
                    orphans.append(Path(ev.path))
                continue
            present = 0
            with os.scandir(ev.path) as entries:
                for f in entries:
                    if TMP_MARK in f.name:
                        orphans.append(Path(f.path))
                    elif f.name in FILES:
                        present += 1
                        files += 1
                        size += f.stat().st_size
            eid = ev.name[len("event=") :]
            if present == len(FILES):
                complete.add(eid)
            elif present:
                partial.add(eid)
    return SymbolScan(frozenset(complete), frozenset(partial), tuple(orphans), files, size)


def iter_symbols(data_dir: str | os.PathLike[str]) -> Iterator[str]:
    root = windows_root(data_dir)
    if root.is_dir():
        with os.scandir(root) as it:
            for e in it:
                if e.is_dir() and e.name.startswith("symbol="):
                    yield e.name[len("symbol=") :]


def check_source(data_dir: str | os.PathLike[str], source: str) -> None:
    """Record which source filled this tree; refuse to continue with a different one."""
    path = Path(data_dir) / SOURCE_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{TMP_MARK}.{os.getpid()}.{time.monotonic_ns()}")
        tmp.write_text(json.dumps({"source": source}))
        try:
            os.link(tmp, path)  # atomic and exclusive: the first writer wins, a racing one re-reads
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    recorded = json.loads(path.read_text()).get("source")
    if recorded != source:
        raise SourceMismatchError(
            f"{Path(data_dir).resolve()} holds data from source {recorded!r} but this run fetches from "
            f"{source!r}; simulated and real data must never mix. Use another SMALLCAPS_DATA_DIR."
        )
