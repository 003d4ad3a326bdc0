"""The on-disk tree: ``event_windows/symbol=SYM/event=EVENT_ID/{trades,quotes}.parquet``.

Every file is written to a temporary file in its own directory, fsynced, then moved into place
with ``os.replace`` (and the directory fsynced), so a reader or a crash never sees half a file.
An event is complete when both files exist; one file alone is a partial event.

On S3 (``SMALLCAPS_DATA_DIR=s3://...``, ``storage.py``) a file is one PUT of the whole object,
which is atomic by itself: no temporary object, no fsync.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from smallcaps_ingest import layout, storage
from smallcaps_ingest.layout import (  # noqa: F401 - the store's names, re-exported for its callers
    FILES,
    SOURCE_FILE,
    TMP_MARK,
    event_dir,
    symbol_dir,
    windows_root,
)

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa


class SourceMismatchError(RuntimeError):
    """Simulated data must never mix into a tree fetched from the real API (or vice versa)."""


def fsync_dir(path: Path) -> None:
    """Make the renames in ``path`` durable. POSIX only: where a directory cannot be opened
    (Windows raises PermissionError), the rename is already durable once ``os.replace`` returns
    (NTFS journals it), so there is nothing to do."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory: the rename stands
        pass
    finally:
        os.close(fd)


def _delta_columns(schema: pa.Schema) -> dict[str, str]:
    import pyarrow as pa

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
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = df.to_arrow()
    sink = pa.BufferOutputStream()
    delta = {k: v for k, v in _delta_columns(table.schema).items()
             if dictionary is not True and k not in (dictionary or ())}
    pq.write_table(table, sink, compression="zstd", compression_level=1, use_dictionary=dictionary,
                   column_encoding=delta, store_schema=False, row_group_size=row_group_size)
    return sink.getvalue()


def atomic_write_bytes(data: bytes | pa.Buffer, dest: Path, sync_dir: bool = True) -> int:
    """Write ``data`` to ``dest`` atomically; returns the bytes written. The one atomic writer of the
    package: a temporary sibling (``layout.tmp_path``), one write, fsync, ``os.replace``, then the
    directory fsynced (unless ``sync_dir=False``: the caller syncs it after several renames).
    An S3 ``dest`` (a URL or a ``UPath``) is one PUT of the whole object (``storage.write_bytes``)."""
    if storage.is_remote(dest):
        return storage.write_bytes(dest, data)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = layout.tmp_path(dest)
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
    if not storage.is_remote(d):
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
    """A symbol's events on disk, by the tree's one scanner (``layout.scan_symbol_dir``)."""
    d = layout.scan_symbol_dir(str(symbol_dir(data_dir, symbol)))
    return SymbolScan(d.complete, d.partial, tuple(Path(p) for p in d.orphans), d.files, d.bytes)  # S3: none


def complete_events(data_dir: str | os.PathLike[str], symbols: Iterable[str]) -> dict[str, frozenset[str]]:
    """Each symbol's complete events. On S3 the symbols' listings run concurrently (one LIST per
    symbol, ~10-30 ms each to S3: 1,600 symbols one after another took most of a minute)."""
    syms = list(symbols)
    if not storage.is_remote(data_dir):
        return {s: scan_symbol(data_dir, s).complete for s in syms}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        return dict(zip(syms, pool.map(lambda s: scan_symbol(data_dir, s).complete, syms), strict=True))


def iter_symbols(data_dir: str | os.PathLike[str]) -> Iterator[str]:
    for sym, _ in layout.list_symbol_dirs(data_dir)[0]:
        yield sym


def check_source(data_dir: str | os.PathLike[str], source: str) -> None:
    """Record which source filled this tree; refuse to continue with a different one."""
    path = storage.join(data_dir, SOURCE_FILE)
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        # first writer wins (a hard link locally, a conditional PUT on S3); a racing one re-reads
        storage.create_bytes(path, json.dumps({"source": source}).encode())
        raw = storage.read_bytes(path)
    recorded = json.loads(raw).get("source")
    if recorded != source:
        where = data_dir if storage.is_remote(data_dir) else Path(data_dir).resolve()
        raise SourceMismatchError(
            f"{where} holds data from source {recorded!r} but this run fetches from "
            f"{source!r}; simulated and real data must never mix. Use another SMALLCAPS_DATA_DIR."
        )
