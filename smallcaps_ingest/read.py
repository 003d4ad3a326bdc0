"""Read the tree as a research dataset: event windows aligned to event time, from explicit file lists.

``load_windows`` selects events from ``manifest.parquet`` (symbols, event types, time range,
sessions) before any data file is opened, checks which selected events are complete on disk
(both files present), and returns one lazy frame over exactly those events' files: never a glob,
so nothing outside the filter is listed or opened. Each row carries the event columns
(``event_id``, ``symbol``, ``event_type``, ``session``, ``timestamp``) and ``t_rel``, the row's
time minus the event time (Duration ns; ``sip_timestamp`` for trades and raw quotes, ``ts`` for
sampled quotes), then the file's own columns (or the ``columns`` asked for).

A symbol whose compacted files (``compact.py``) are fresh for every selected event is read from
its files of the selected event types instead of its per-event files (whole files, unfiltered,
where the selection holds all of a file's events); the frame is the same either way (same rows,
order and types). Rows come in ``ORDER`` (symbol, event type, event time, event id) and, inside
an event, in the file's own order.

``duckdb_connect`` registers the same selection as DuckDB views ``events``, ``trades`` and
``quotes`` (also built from explicit file lists).

Paths: a local directory, or an ``s3://bucket/prefix`` URL (``storage.py``: configured by the AWS_*
variables). On S3 the complete events are found by one listing per selected symbol (not two HEADs
per event), and the selected files are fetched whole, concurrently, then parsed (the frame is then
backed by memory rather than scanned lazily); ``duckdb_connect`` is local only. No Dagster here.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal, TypedDict, Unpack

import polars as pl

from smallcaps_ingest import layout, storage
from smallcaps_ingest.core import compact, shape, store
from smallcaps_ingest.core.compact import EVENT_COLUMNS, ORDER
from smallcaps_ingest.core.manifest import SESSIONS

if TYPE_CHECKING:
    import duckdb

__all__ = ["EVENT_COLUMNS", "ORDER", "IncompleteEventsError", "ReadPlan", "duckdb_connect",
           "load_windows", "plan_windows"]

KINDS = ("trades", "quotes")
MANIFEST_FILE = layout.MANIFEST_FILE
_PATH = "__path"
_EXAMPLES = 20


class IncompleteEventsError(ValueError):
    """Selected events that are not complete on disk (``on_missing="raise"``)."""

    def __init__(self, event_ids: Sequence[str]) -> None:
        self.event_ids = list(event_ids)
        shown = ", ".join(self.event_ids[:_EXAMPLES])
        more = f" (and {len(self.event_ids) - _EXAMPLES} more)" if len(self.event_ids) > _EXAMPLES else ""
        super().__init__(
            f"{len(self.event_ids)} selected event(s) are not complete on disk (trades.parquet and "
            f"quotes.parquet both present): {shown}{more}; materialize event_windows for their symbols, "
            f"or pass on_missing='skip'"
        )


@dataclass(frozen=True)
class Piece:
    """Consecutive files read the same way: per-event files; compacted files holding only selected
    events (``whole``: read unfiltered); or compacted files filtered to the selected events."""

    compacted: bool
    files: list[str]
    events: pl.DataFrame  # EVENT_COLUMNS (+ __path, one row per file, for per-event pieces), in ORDER
    whole: bool = False
    # filtered compacted files: no event left out shares an event time with a selected one, so
    # the selected times alone pick the rows (an integer filter, not a join on the ids)
    by_time: bool = False


@dataclass(frozen=True)
class ReadPlan:
    """What ``load_windows`` reads: the selected complete events, the incomplete ones, the files."""

    kind: str
    events: pl.DataFrame  # selected complete events, EVENT_COLUMNS, in ORDER
    missing: list[str]  # selected event ids not complete on disk
    pieces: list[Piece]

    @property
    def files(self) -> list[str]:
        """Every data file the plan opens (and no other)."""
        return [f for p in self.pieces for f in p.files]


def _root(data_dir: str | os.PathLike[str]) -> str:
    text = str(data_dir)
    if "://" in text and not storage.is_remote(text):
        raise NotImplementedError(f"{text!r}: a local directory or an s3:// URL")
    return text.rstrip("/") if storage.is_remote(text) else text


def _names(value: str | Iterable[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{what} must be strings, got {bad[:3]!r}")
    return names


def _aware(value: datetime | None, what: str) -> datetime | None:
    if value is not None and (not isinstance(value, datetime) or value.utcoffset() is None):
        raise ValueError(f"{what}={value!r} must be a datetime with a time zone")
    return value


def select_events(
    data_dir: str | os.PathLike[str],
    *,
    symbols: str | Iterable[str] | None = None,
    event_types: str | Iterable[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    sessions: str | Iterable[str] | None = None,
) -> pl.DataFrame:
    """The manifest's events that pass the filters (``start <= timestamp < end``), in ``ORDER``."""
    path = storage.join(_root(data_dir), MANIFEST_FILE)
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: no manifest; materialize the `manifest` asset first")
    sess = _names(sessions, "sessions")
    if sess is not None and (unknown := sorted(set(sess) - set(SESSIONS))):
        raise ValueError(f"unknown session(s) {unknown}; sessions are {list(SESSIONS)}")
    lf = (pl.read_parquet(storage.source(path), columns=EVENT_COLUMNS).lazy() if storage.is_remote(path)
          else pl.scan_parquet(path).select(EVENT_COLUMNS))
    by = {"symbol": _names(symbols, "symbols"), "event_type": _names(event_types, "event_types"),
          "session": sess}
    for col, vals in by.items():
        if vals is not None:
            lf = lf.filter(pl.col(col).is_in(vals))
    if (lo := _aware(start, "start")) is not None:
        lf = lf.filter(pl.col("timestamp") >= lo)
    if (hi := _aware(end, "end")) is not None:
        lf = lf.filter(pl.col("timestamp") < hi)
    return lf.sort(ORDER).collect()


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        return compact.stat_key(os.stat(path))
    except FileNotFoundError:
        return None


def _listed(sdir: str) -> dict[str, tuple[int, int, int]]:
    """S3: one listing of a symbol's prefix: url -> its identity (``storage.identity``'s shape)."""
    return {url: (tag, size, 0) for url, (size, _, tag) in storage.find(sdir).items()}


class Selection(TypedDict, total=False):
    """The keywords that select events, shared by ``plan_windows`` and ``duckdb_connect``."""

    symbols: str | Iterable[str] | None
    event_types: str | Iterable[str] | None
    start: datetime | None
    end: datetime | None
    sessions: str | Iterable[str] | None
    on_missing: Literal["skip", "raise"]
    use_compacted: bool


def plan_windows(
    data_dir: str | os.PathLike[str],
    kind: Literal["trades", "quotes"],
    *,
    symbols: str | Iterable[str] | None = None,
    event_types: str | Iterable[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    sessions: str | Iterable[str] | None = None,
    on_missing: Literal["skip", "raise"] = "skip",
    use_compacted: bool = True,
) -> ReadPlan:
    """Select events, find the complete ones (two ``stat`` calls per event, no file opened) and
    choose, per symbol, compacted files (fresh for every selected event) or per-event files."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {list(KINDS)}")
    if on_missing not in ("skip", "raise"):
        raise ValueError(f"on_missing={on_missing!r}: expected 'skip' or 'raise'")
    root = _root(data_dir)
    events = select_events(root, symbols=symbols, event_types=event_types, start=start, end=end,
                           sessions=sessions)
    ids, syms = events["event_id"].to_list(), events["symbol"].to_list()
    paths: list[str] = []
    prints: list[tuple[int, ...] | None] = []
    sdirs: dict[str, str] = {}
    remote = storage.is_remote(root)
    listed: dict[str, tuple[int, int, int]] = {}
    stat = listed.get if remote else _stat
    for symbol, eid in zip(syms, ids, strict=True):
        if symbol not in sdirs:
            sdirs[symbol] = str(store.symbol_dir(root, symbol))
            if remote:
                listed.update(_listed(sdirs[symbol]))
        if "/" in eid or eid.startswith("."):  # what store.event_dir refuses, without a Path per event
            store.event_dir(root, symbol, eid)
        d = f"{sdirs[symbol]}/{layout.EVENT_PREFIX}{eid}"
        t, q = stat(f"{d}/{store.FILES[0]}"), stat(f"{d}/{store.FILES[1]}")
        prints.append(t + q if t and q else None)
        paths.append(f"{d}/{kind}.parquet")
    complete = [p is not None for p in prints]
    missing = [e for e, ok in zip(ids, complete, strict=True) if not ok]
    if missing and on_missing == "raise":
        raise IncompleteEventsError(missing)
    # per symbol: compacted when its sidecar is fresh for every selected complete event
    sidecars: dict[str, compact.Sidecar] = {}
    stale: set[str] = set()
    for symbol, eid, etype, fp in zip(syms, ids, events["event_type"].to_list(), prints, strict=True):
        if fp is None or symbol in stale:
            continue
        if symbol not in sidecars:
            side = compact.read_sidecar(root, symbol) if use_compacted else None
            if side is None or kind not in side.files:
                stale.add(symbol)
                continue
            sidecars[symbol] = side
        if sidecars[symbol].fingerprint(eid, etype) != fp:
            stale.add(symbol)
    fresh = [s for s in sidecars if s not in stale]
    selected = events.with_columns(pl.Series(_PATH, paths)).filter(pl.Series(complete, dtype=pl.Boolean))
    mode = selected["symbol"].is_in(fresh)
    runs = selected.with_columns(mode.alias("__c"), mode.rle_id().alias("__run"))
    pieces: list[Piece] = []
    for _, run in runs.group_by("__run", maintain_order=True):  # consecutive symbols read the same way
        if run["__c"][0]:
            pieces.extend(_compacted_pieces(kind, run.select(EVENT_COLUMNS), sidecars))
        else:
            pieces.append(Piece(False, run[_PATH].to_list(), run.select(*EVENT_COLUMNS, _PATH)))
    return ReadPlan(kind, selected.select(EVENT_COLUMNS), missing, pieces)


def _compacted_pieces(kind: str, events: pl.DataFrame, sidecars: dict[str, compact.Sidecar]) -> list[Piece]:
    """Fresh symbols' selected events (in ORDER) as pieces over their (symbol, type) files:
    consecutive files whose every event is selected form a ``whole`` piece, the rest filtered
    ones, ``by_time`` when the event times alone tell the selected events apart in every file."""
    keys = ["symbol", "event_type"]
    selected: dict[tuple[str, str], dict[str, int]] = {}
    rows = events.select(*keys, "event_id", pl.col("timestamp").dt.epoch("ns")).iter_rows()
    for sym, etype, eid, ns in rows:
        selected.setdefault((sym, etype), {})[eid] = ns
    # a piece's files are filtered on the times selected in any of them, so a file left out of
    # nothing at any of those times is told apart by time
    times = {ns for chosen in selected.values() for ns in chosen.values()}
    paths, modes = [], []
    for (symbol, event_type), chosen in selected.items():
        side = sidecars[symbol]
        paths.append(side.path(kind, event_type))
        if side.counts[event_type] == len(chosen):  # the selection holds all of the file's events
            modes.append(0)
        else:
            left_out = (ns for eid, ns in side.timed_ids(event_type) if eid not in chosen)
            modes.append(2 if any(ns in times for ns in left_out) else 1)
    mode = pl.Series("__mode", modes, dtype=pl.UInt8)
    groups = pl.DataFrame([pl.Series(k, [g[i] for g in selected], dtype=pl.String)
                           for i, k in enumerate(keys)])
    groups = groups.with_columns(pl.Series(_PATH, paths), mode, mode.rle_id().alias("__run"))
    tagged = events.join(groups.select(*keys, "__run"), on=keys, how="left", maintain_order="left")
    return [
        Piece(True, g[_PATH].to_list(), e.drop("__run"), whole=g["__mode"][0] == 0,
              by_time=g["__mode"][0] == 1)
        for g, e in zip(groups.partition_by("__run", maintain_order=True),
                        tagged.partition_by("__run", maintain_order=True), strict=True)
    ]


def _file_columns(plan: ReadPlan) -> dict[str, pl.DataType]:
    if not plan.pieces:
        return dict(shape.TRADES_SCHEMA if plan.kind == "trades" else shape.QUOTES_SCHEMA)
    schema = pl.read_parquet_schema(storage.source(plan.pieces[0].files[0]))
    return {k: v for k, v in schema.items() if k not in EVENT_COLUMNS}


def _time_column(schema: dict[str, pl.DataType]) -> str:
    return "ts" if "ts" in schema else "sip_timestamp"  # sampled quotes: ts; trades, raw quotes: sip


def _columns(plan: ReadPlan, columns: Sequence[str] | None) -> tuple[str, list[str]]:
    schema = _file_columns(plan)
    if columns is None:
        return _time_column(schema), list(schema)
    wanted = [c for c in columns if c not in (*EVENT_COLUMNS, "t_rel")]
    unknown = [c for c in wanted if c not in schema]
    if unknown:
        raise ValueError(
            f"column(s) {unknown} are not in the {plan.kind} files; their columns: {list(schema)}"
        )
    return _time_column(schema), wanted


def frame(plan: ReadPlan, columns: Sequence[str] | None = None) -> pl.LazyFrame:
    """The plan's rows as one lazy frame: event columns, ``t_rel``, then the file's columns."""
    time_col, cols = _columns(plan, columns)
    read = list(dict.fromkeys([time_col, *cols]))
    out = [*EVENT_COLUMNS, (pl.col(time_col) - pl.col("timestamp")).alias("t_rel"), *cols]
    parts: list[pl.LazyFrame] = []
    blobs = storage.read_many(f for p in plan.pieces for f in p.files) if _remote(plan) else None

    def scan(files: list[str], **kw: str) -> pl.LazyFrame:
        if blobs is None:
            return pl.scan_parquet(files, **kw)
        return pl.concat([_parsed(f, blobs[f], kw.get("include_file_paths")) for f in files]).lazy()

    for p in plan.pieces:
        if p.compacted and p.whole:
            lf = scan(p.files)
        elif p.compacted:
            ns = p.events["timestamp"].dt.epoch("ns")  # integer bounds: a Python datetime stops at us
            lo, hi = (pl.lit(v).cast(p.events.schema["timestamp"]) for v in (ns.min(), ns.max()))
            # coarse bounds first: a file's rows are sorted by event time, so row groups are
            # skipped on their statistics; then exactly the selected events, by their times when
            # those tell them apart (``Piece.by_time``), else by a semi join on the ids. The join
            # took as long as the rest of the read, and an ``is_in`` on the ids, pushed into the
            # scan, twice as long as the join (benchmarks/README.md, D14)
            lf = scan(p.files).filter(pl.col("timestamp").is_between(lo, hi))
            if p.by_time:
                lf = lf.filter(pl.col("timestamp").is_in(p.events["timestamp"].unique().implode()))
            else:
                lf = lf.join(p.events.lazy().select("event_id"), on="event_id", how="semi",
                             maintain_order="left")
        else:
            lf = scan(p.files, include_file_paths=_PATH).select(_PATH, *read).join(
                p.events.lazy(), on=_PATH, how="left", maintain_order="left"
            )
        parts.append(lf.select(out))
    if not parts:
        schema = {**plan.events.schema, **_file_columns(plan)}
        return pl.DataFrame(schema=schema).lazy().select(out)
    return pl.concat(parts, how="vertical") if len(parts) > 1 else parts[0]


def _remote(plan: ReadPlan) -> bool:
    return any(storage.is_remote(f) for p in plan.pieces for f in p.files[:1])


def _parsed(url: str, blob: bytes, path_column: str | None) -> pl.DataFrame:
    df = pl.read_parquet(io.BytesIO(blob))
    return df.with_columns(pl.lit(url).alias(path_column)) if path_column else df


def load_windows(
    data_dir: str | os.PathLike[str],
    kind: Literal["trades", "quotes"] = "trades",
    *,
    symbols: str | Iterable[str] | None = None,
    event_types: str | Iterable[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    sessions: str | Iterable[str] | None = None,
    columns: Sequence[str] | None = None,
    on_missing: Literal["skip", "raise"] = "skip",
    use_compacted: bool = True,
) -> pl.LazyFrame:
    """The selected events' trades or quotes as one lazy frame aligned to event time.

    Filters: ``symbols``, ``event_types``, ``sessions`` (a name or names), ``start <= timestamp <
    end`` (aware datetimes, on the event time). Only complete events are read; incomplete ones
    are skipped, or named by ``IncompleteEventsError`` with ``on_missing="raise"``. Compacted
    files are used where fresh unless ``use_compacted=False``."""
    plan = plan_windows(data_dir, kind, symbols=symbols, event_types=event_types, start=start, end=end,
                        sessions=sessions, on_missing=on_missing, use_compacted=use_compacted)
    return frame(plan, columns)


def _sql_list(items: Iterable[str]) -> str:
    return "[" + ", ".join("'" + s.replace("'", "''") + "'" for s in items) + "]"


def _view_sql(con: duckdb.DuckDBPyConnection, plan: ReadPlan) -> str:
    time_col, cols = _columns(plan, None)
    ev = ", ".join(f'e."{c}"' for c in EVENT_COLUMNS)
    fc = ", ".join(f'f."{c}"' for c in cols)
    t_rel = f'epoch_ns(f."{time_col}") - epoch_ns(e."timestamp") AS t_rel_ns'
    selects: list[str] = []
    for i, p in enumerate(plan.pieces):
        name = f"_smallcaps_{plan.kind}_{i}"
        con.register(name, p.events.to_arrow())
        if p.compacted:
            selects.append(
                f"SELECT {ev}, {t_rel}, {fc} FROM read_parquet({_sql_list(p.files)}) f "
                f"JOIN {name} e ON f.event_id = e.event_id"
            )
        else:
            selects.append(
                f"SELECT {ev}, {t_rel}, {fc} FROM read_parquet({_sql_list(p.files)}, filename = true) f "
                f'JOIN {name} e ON f.filename = e."{_PATH}"'
            )
    if not selects:
        return f"SELECT {', '.join(EVENT_COLUMNS)}, NULL::BIGINT AS t_rel_ns FROM events WHERE false"
    return "\nUNION ALL\n".join(selects)


def duckdb_connect(
    data_dir: str | os.PathLike[str],
    con: duckdb.DuckDBPyConnection | None = None,
    **selection: Unpack[Selection],
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection (``con`` or a new in-memory one) with views ``events`` (the selected
    complete events), ``trades`` and ``quotes`` (event columns, ``t_rel_ns`` BIGINT: the row's time
    minus the event time in nanoseconds, then the file's columns), built from the same plans as
    ``load_windows``, selected by the same keywords (``Selection``). Rows are in no particular order
    (SQL); ORDER BY what you need."""
    try:
        import duckdb
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("duckdb_connect needs duckdb: pip install 'smallcaps_ingest[duckdb]'") from None
    if storage.is_remote(data_dir):
        raise NotImplementedError(
            f"duckdb_connect({str(data_dir)!r}): local trees only; load_windows reads S3"
        )
    con = con if con is not None else duckdb.connect()
    plans = {k: plan_windows(data_dir, k, **selection) for k in KINDS}
    con.register("_smallcaps_events", plans["trades"].events.to_arrow())
    con.execute("CREATE OR REPLACE VIEW events AS SELECT * FROM _smallcaps_events")
    for kind, plan in plans.items():
        con.execute(f"CREATE OR REPLACE VIEW {kind} AS {_view_sql(con, plan)}")
    return con
