"""Compaction for reading: each symbol's complete events in one trades and one quotes file per event type.

The per-event tree (``event_windows/symbol=S/event=E/{trades,quotes}.parquet``) stays the ingest's
contract; these files are a derived copy that is cheap to read: a hive glob over ~1.15 million
small files spends its time opening and listing them, a symbol's compacted files are opened
once. Layout::

    compacted/symbol=S/trades.<generation>.<k>.parquet   # k: the event type's index in the sidecar
                      /quotes.<generation>.<k>.parquet
                      /_compaction.json                   # the sidecar: what the generation holds

Rows carry the event columns (``read.EVENT_COLUMNS``) then the per-event file's own columns, in
``read.ORDER`` (event type, event time, event id) and, inside an event, the file's own order.
One file per event type, because research reads by type: a type's rows are then whole files, read
without a filter, where one file per symbol made every query of one type open and filter all of
a symbol's rows (polars skips no row groups on string statistics; benchmarks/README.md, D14). Row
groups are small and carry min/max statistics, so a filter on the event ``timestamp`` (sorted
inside a file) skips most of a file.

Freshness without Dagster: the sidecar records, for every event it holds, its type, its event time
and the (inode, size, mtime) of both per-event files as they were when read (``os.fstat`` of the
open file, so a file replaced while compacting is caught). Every writer replaces a file by a rename,
which gives it a new inode, so a reader comparing those fingerprints with the files on disk now
knows whether the compacted rows are still exactly the per-event files' rows (``read.load_windows``
does this per event and falls back to the per-event files for a symbol when any differs or is not
compacted).

Files are written with ``store.atomic_write_parquet``/``atomic_write_bytes``: data files first
under a new generation name, the sidecar last (the switch), then older generations are removed.
A crash at any point leaves the previous sidecar and the files it names intact. No Dagster here.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from smallcaps_ingest import layout, storage
from smallcaps_ingest.core import store

COMPACT_DIR = layout.COMPACT_DIR
SIDECAR = "_compaction.json"
SIDECAR_VERSION = 3  # 3: ids, fingerprints and event times packed per event type (Sidecar)
# Small row groups so that one event type's rows (10 % of a symbol's, say) cost a few groups, not
# the file; large enough that each group's fixed cost stays small (benchmarks/README.md).
ROW_GROUP_ROWS = 8192
EVENT_COLUMNS = ["event_id", "symbol", "event_type", "session", "timestamp"]
ORDER = ["symbol", "event_type", "timestamp", "event_id"]

Fingerprint = tuple[int, int, int, int, int, int]  # (ino, size, mtime_ns) of trades, then of quotes


def symbol_compact_dir(data_dir: str | os.PathLike[str], symbol: str) -> Path:
    return layout.compact_root(data_dir) / layout.symbol_part(symbol)


def stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Sidecar:
    """What one compaction generation of a symbol holds.

    Per event type, its events' ids (one newline-joined string), fingerprints (one base64 string, 64
    characters per event) and event times (base64 int64) stay as read, and are unpacked for a type
    only when it is asked for: a reader checks a few events of one type in each of many symbols (a
    JSON list of every event's fingerprint made ``orjson`` most of a full-size read's planning:
    D14)."""

    symbol: str
    files: dict[str, dict[str, str]]  # kind -> event type -> file name in the symbol's directory
    counts: dict[str, int]  # event type -> events held (a type's file holds exactly these)
    packed: dict[str, tuple[str, str]]  # event type -> (ids joined by newlines, fingerprints)
    times: dict[str, str]  # event type -> its events' times (ns), little-endian int64, base64
    written_ns: int
    directory: str  # the symbol's compacted directory

    _unpacked: dict[str, tuple[dict[str, int], str]] = field(default_factory=dict, compare=False, repr=False)

    def path(self, kind: str, event_type: str) -> str:
        return f"{self.directory}/{self.files[kind][event_type]}"

    def _positions(self, event_type: str) -> tuple[dict[str, int], str]:
        if event_type in self._unpacked:
            return self._unpacked[event_type]
        ids, prints = self.packed[event_type]
        position = {e: i for i, e in enumerate(ids.split("\n"))} if ids else {}
        if len(position) != self.counts[event_type] or len(prints) != PRINT_CHARS * len(position):
            raise ValueError(f"{self.directory}/{SIDECAR}: its event ids, counts and fingerprints of "
                             f"event type {event_type!r} disagree; compact {self.symbol} again")
        self._unpacked[event_type] = position, prints
        return position, prints

    def fingerprint(self, event_id: str, event_type: str) -> Fingerprint | None:
        """The event's per-event files as compacted, or None when the generation does not hold it."""
        if event_type not in self.packed:
            return None
        position, prints = self._positions(event_type)
        i = position.get(event_id)
        if i is None:
            return None
        return unpack_ints(prints[PRINT_CHARS * i:PRINT_CHARS * (i + 1)])  # type: ignore[return-value]

    def timed_ids(self, event_type: str) -> list[tuple[str, int]]:
        """The type's events in their file's order, each with its event time (ns since the epoch)."""
        position, _ = self._positions(event_type)
        times = unpack_ints(self.times[event_type])
        if len(times) != len(position):
            raise ValueError(f"{self.directory}/{SIDECAR}: its event times of event type {event_type!r} "
                             f"disagree with its ids; compact {self.symbol} again")
        return list(zip(position, times, strict=True))

    @functools.cached_property
    def types(self) -> dict[str, str]:
        """event_id -> event type, of every held event."""
        return {e: t for t in self.packed for e in self._positions(t)[0]}

    @functools.cached_property
    def events(self) -> dict[str, Fingerprint]:
        """event_id -> fingerprint, of every held event."""
        return {e: self.fingerprint(e, t) for e, t in self.types.items()}  # type: ignore[misc]


# A fingerprint packed (``pack_ints``): six int64, 48 bytes, so exactly 64 base64 characters.
PRINT_CHARS = 64


def pack_ints(values: list[int]) -> str:
    """Integers as little-endian int64, base64: how the sidecar keeps fingerprints and times."""
    return base64.b64encode(struct.pack(f"<{len(values)}q", *values)).decode("ascii")


def unpack_ints(packed: str) -> tuple[int, ...]:
    raw = base64.b64decode(packed)
    return struct.unpack(f"<{len(raw) // 8}q", raw)


def read_sidecar(data_dir: str | os.PathLike[str], symbol: str) -> Sidecar | None:
    """The symbol's current sidecar, or None when there is none (or it is not one we wrote)."""
    directory = symbol_compact_dir(data_dir, symbol)
    try:
        raw: dict[str, Any] = orjson.loads(storage.read_bytes(directory / SIDECAR))
    except FileNotFoundError:
        return None
    if raw.get("version") != SIDECAR_VERSION or raw.get("symbol") != symbol:
        return None
    types: list[str] = raw["types"]
    return Sidecar(
        symbol=symbol,
        files={kind: dict(zip(types, names, strict=True)) for kind, names in raw["files"].items()},
        counts=dict(zip(types, raw["counts"], strict=True)),
        packed=dict(zip(types, zip(raw["event_ids"], raw["fingerprints"], strict=True), strict=True)),
        times=dict(zip(types, raw["times"], strict=True)),
        written_ns=int(raw["written_ns"]),
        directory=str(directory),
    )


@dataclass(frozen=True)
class CompactionResult:
    symbol: str
    events: int  # complete events compacted
    incomplete: int  # manifest events of the symbol not complete on disk (left out)
    rows: dict[str, int]
    bytes: int
    seconds: float


def _read_event(edir: Path) -> tuple[list[pl.DataFrame], Fingerprint] | None:
    """Both files of one event and their fingerprint, or None when the event is not complete.

    Each file is read through the descriptor it was fstat'ed on, so the rows belong to exactly
    the inode the fingerprint names even if the file is replaced meanwhile. On S3 the fingerprint
    is the object's ETag and size (``storage.identity``), taken just before its GET."""
    frames: list[pl.DataFrame] = []
    fp: list[int] = []
    if storage.is_remote(edir):
        for name in store.FILES:
            key = storage.identity(edir / name)
            try:
                frames.append(pl.read_parquet(io.BytesIO(storage.read_bytes(edir / name))))
            except FileNotFoundError:
                key = None
            if key is None:
                return None
            fp.extend(key)
        return frames, tuple(fp)  # type: ignore[return-value]
    for name in store.FILES:
        try:
            with open(edir / name, "rb") as fh:
                fp.extend(stat_key(os.fstat(fh.fileno())))
                frames.append(pl.read_parquet(io.BytesIO(fh.read())))
        except FileNotFoundError:
            return None
    return frames, tuple(fp)  # type: ignore[return-value]


def compact_symbol(data_dir: str | os.PathLike[str], symbol: str, manifest: pl.DataFrame) -> CompactionResult:
    """Compact one symbol's complete manifest events into a new generation; returns its figures."""
    t0 = time.perf_counter()
    events = manifest.filter(pl.col("symbol") == symbol).select(EVENT_COLUMNS).sort(ORDER)
    parts: dict[str, list[pl.DataFrame]] = {k: [] for k in ("trades", "quotes")}
    fingerprints: dict[str, Fingerprint] = {}
    incomplete = 0
    for i, event_id in enumerate(events["event_id"]):
        got = _read_event(store.event_dir(data_dir, symbol, event_id))
        if got is None:
            incomplete += 1
            continue
        (trades, quotes), fingerprints[event_id] = got
        for kind, df in (("trades", trades), ("quotes", quotes)):
            parts[kind].append(df.with_columns(pl.lit(i, pl.UInt32).alias("__i")))
    out = symbol_compact_dir(data_dir, symbol)
    generation = f"{time.time_ns():x}"
    held = events.filter(pl.col("event_id").is_in(list(fingerprints)))
    types = held["event_type"].unique(maintain_order=True).to_list()  # sorted: events are in ORDER
    files = {kind: [f"{kind}.{generation}.{k}.parquet" for k in range(len(types))] for kind in parts}
    size = 0
    rows: dict[str, int] = {}
    if fingerprints:
        # the event columns by row index, not as Python values (a datetime would lose nanoseconds)
        index = events.with_row_index("__i")
        for kind, frames in parts.items():
            body = pl.concat(frames, how="vertical")
            df = body.join(index, on="__i", how="left", maintain_order="left").select(
                *EVENT_COLUMNS, pl.exclude([*EVENT_COLUMNS, "__i"])
            )
            rows[kind] = df.height
            by_type = df.partition_by("event_type", maintain_order=True, as_dict=True)
            for k, event_type in enumerate(types):  # a type whose windows are all empty: a 0-row file
                size += store.atomic_write_parquet(
                    by_type.get((event_type,), df.clear()), out / files[kind][k], sync_dir=False,
                    row_group_size=ROW_GROUP_ROWS, dictionary=EVENT_COLUMNS[:4],
                )
    by_type: dict[str, list[str]] = {t: [] for t in types}
    times: dict[str, list[int]] = {t: [] for t in types}
    for e, t, ns in held.select("event_id", "event_type", pl.col("timestamp").dt.epoch("ns")).iter_rows():
        by_type[t].append(e)
        times[t].append(ns)
    sidecar = {
        "version": SIDECAR_VERSION,
        "symbol": symbol,
        "types": types,
        "files": files if fingerprints else {},
        "written_ns": time.time_ns(),
        "counts": [len(by_type[t]) for t in types],
        "event_ids": ["\n".join(by_type[t]) for t in types],
        "fingerprints": [pack_ints([v for e in by_type[t] for v in fingerprints[e]]) for t in types],
        "times": [pack_ints(times[t]) for t in types],
    }
    if not storage.is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    store.atomic_write_bytes(orjson.dumps(sidecar), out / SIDECAR)  # fsyncs the directory: files too
    keep = {SIDECAR, *(n for names in files.values() for n in names)} if fingerprints else {SIDECAR}
    present = list(storage.find(str(out))) if storage.is_remote(out) else [str(p) for p in out.iterdir()]
    for old in present:
        name = old.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]
        if name not in keep and not name.startswith(SIDECAR):
            storage.remove(old)  # earlier generations (a reader mid-scan of one may fail)
    return CompactionResult(symbol, len(fingerprints), incomplete, rows, size, time.perf_counter() - t0)
