"""Reading the tree: a hive glob (polars, DuckDB) against ``load_windows`` (per-event and compacted).

    python benchmarks/read_bench.py                       # 100,000 events: generate, compact, time
    python benchmarks/read_bench.py --keep                # keep the tree (benchmarks/out/read_N)
    python benchmarks/read_bench.py --reuse               # time a kept tree again
    python benchmarks/read_bench.py --events 572850 --per-symbol 354 --query-events 10000   # full size

The tree: ``--events`` events (default 100,000), ``--per-symbol`` per symbol (150, so 667
symbols), ``--types`` event types (10, assigned round-robin: 10,000 events per type), RTH
events on weekdays of 2024-2025. Each event's files are written by ``store.write_event`` (the
real writer: same encoding, atomic, fsynced) from one of a few dozen small-cap windows shaped from
the simulator's ground truth (``shape.shape_trades`` / ``shape_quotes`` at 1 Hz), shifted to the
event's time: tens to ~1,000 trades and up to 600 quote rows per event, ~5-40 KB per file.
Then every symbol is compacted (``compact.compact_symbol``) and the queries are timed, page cache
warm (the tree was just written or read), each the best of ``--runs``:

1. the quotes of every event of one type (10,000 events) into one frame;
2. all trades of one symbol (150 events) into one frame.

by (a) ``pl.scan_parquet`` hive glob over ``event_windows/*/*/{kind}.parquet`` filtered on the hive
columns, (b) DuckDB ``read_parquet`` with the same glob and filter, (c) ``load_windows`` on the
per-event files (``use_compacted=False``), (d) ``load_windows`` on the compacted files. Every method's
frame must hold the same rows as (c) (checked). The hive-glob methods run once each unless
``--runs-glob`` (they take tens of seconds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import _bootstrap  # noqa: F401
import duckdb
import polars as pl
from _common import load_average, table

from smallcaps_ingest import read
from smallcaps_ingest.core import compact, shape, store
from smallcaps_ingest.simulator import ground_truth

ROOT = Path(__file__).resolve().parents[1]
MIN_NS = 60_000_000_000
DAY_NS = 86_400 * 1_000_000_000
T0_NS = 1_704_724_200_000_000_000  # Monday 2024-01-08 14:30 UTC (09:30 New York)
TEMPLATE_SYMBOLS = ("XELB", "DGLY", "GNUS", "FCEL")  # the simulator's quieter names
TS_COLUMNS = {"trades": ("sip_timestamp", "participant_timestamp", "trf_timestamp"),
              "quotes": ("ts", "sip_timestamp")}


def _raw(kind: str, ticker: str, lo: int, hi: int) -> pl.DataFrame:
    rows = ground_truth(kind, ticker, lo, hi)
    schema = shape.RAW_SCHEMAS[kind]
    return pl.DataFrame({c: [r.get(c) for r in rows] for c in schema}, schema=schema, strict=False)


def templates(n: int = 32) -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    """Small-cap event windows shaped like the pipeline's; timestamps as ns offsets from the event."""
    out = []
    for k in range(n):
        ev = T0_NS + (k // len(TEMPLATE_SYMBOLS)) * DAY_NS + (20 + 37 * k % 300) * MIN_NS
        sym = TEMPLATE_SYMBOLS[k % len(TEMPLATE_SYMBOLS)]
        lo, hi = ev - 3 * MIN_NS, ev + 7 * MIN_NS
        trades = shape.shape_trades(_raw("trades", sym, lo, hi), lo, hi)
        quotes = shape.shape_quotes(_raw("quotes", sym, lo, hi), lo, hi, 1.0)
        out.append(tuple(df.with_columns(pl.col(c).dt.epoch("ns") - ev for c in TS_COLUMNS[kind])
                         for kind, df in (("trades", trades), ("quotes", quotes))))
    return out  # type: ignore[return-value]


def manifest(n: int, per_symbol: int, types: int) -> pl.DataFrame:
    """The real manifest's columns; each symbol's events on distinct weekdays, RTH."""
    i = pl.int_range(0, n, eager=True)
    j = i % per_symbol
    day = j // 5 * 7 + j % 5  # a symbol's events on distinct weekdays
    ns = T0_NS + day * DAY_NS + ((i * 7919) % 360) * MIN_NS
    df = pl.DataFrame({"i": i, "ns": ns}).with_columns(
        symbol=pl.format("S{}", (pl.col("i") // per_symbol).cast(pl.String).str.zfill(4)),
        event_type=pl.format("type_{}", (pl.col("i") % types).cast(pl.String)),
        timestamp=pl.col("ns").cast(pl.Datetime("ns", "UTC")),
    )
    return df.with_columns(
        event_id=pl.format("{}_{}_{}", pl.col("symbol"), pl.col("event_type").str.to_uppercase(),
                           pl.col("timestamp").dt.strftime("%Y%m%d_%H%M%S")),
        ts_start=(pl.col("ns") - 3 * MIN_NS).cast(pl.Datetime("ns", "UTC")),
        ts_end=(pl.col("ns") + 7 * MIN_NS).cast(pl.Datetime("ns", "UTC")),
        session=pl.lit("RTH"),
    ).select("event_id", "symbol", "event_type", "timestamp", "ts_start", "ts_end", "session")


def _write_share(data: Path, n: int, per_symbol: int, types: int, share: int, shares: int) -> int:
    """Write every ``shares``-th symbol's events starting at ``share``; events already complete
    (an interrupted generation) are left alone. Returns the bytes written."""
    tpl = templates()
    man = manifest(n, per_symbol, types).with_row_index("k")
    size = 0
    ev_ns = man.select("k", "symbol", "event_id", pl.col("timestamp").dt.epoch("ns"))
    for k, sym, eid, ts in ev_ns.iter_rows():
        if (k // per_symbol) % shares != share:
            continue
        if (store.event_dir(data, sym, eid) / store.FILES[1]).exists():
            continue
        trades, quotes = tpl[(k * 13) % len(tpl)]
        size += store.write_event(
            data, sym, eid,
            trades.with_columns((pl.col(c) + ts).cast(shape.TS) for c in TS_COLUMNS["trades"]),
            quotes.with_columns((pl.col(c) + ts).cast(shape.TS) for c in TS_COLUMNS["quotes"]),
        )
    return size


def _compact_share(data: Path, share: int, shares: int) -> None:
    man = pl.read_parquet(data / "manifest.parquet")
    for i, sym in enumerate(man["symbol"].unique(maintain_order=True)):
        if i % shares == share:
            compact.compact_symbol(data, sym, man)


def compact_all(data: Path, workers: int) -> float:
    """Compact every symbol (``workers`` processes); returns the seconds it took."""
    t = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:  # polars + fork hangs
        list(pool.map(_compact_share, [data] * workers, range(workers), [workers] * workers))
    return round(time.perf_counter() - t, 1)


def generate(data: Path, n: int, per_symbol: int, types: int, workers: int) -> dict[str, float]:
    """The tree (``workers`` processes, each its share of the symbols), then its compaction."""
    t = time.perf_counter()
    man = manifest(n, per_symbol, types)
    data.mkdir(parents=True, exist_ok=True)
    man.write_parquet(data / "manifest.parquet")
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:  # polars + fork hangs
        size = sum(pool.map(_write_share, *zip(*[(data, n, per_symbol, types, i, workers)
                                                 for i in range(workers)], strict=True)))
    gen_s = time.perf_counter() - t
    print(f"  {n:,} events written in {gen_s:.0f}s", flush=True)
    return {"generate_s": round(gen_s, 1), "compact_s": compact_all(data, workers),
            "bytes_written_now": size, "symbols": man["symbol"].n_unique(), "workers": workers}


def glob_polars(data: Path, kind: str, where: pl.Expr, man: pl.DataFrame) -> pl.DataFrame:
    lf = pl.scan_parquet(f"{data}/event_windows/*/*/{kind}.parquet", hive_partitioning=True,
                         hive_schema={"symbol": pl.String, "event": pl.String})
    return lf.filter(where).join(man.lazy().select(read.EVENT_COLUMNS), left_on="event",
                                 right_on="event_id").collect()


def glob_duckdb(data: Path, kind: str, where_sql: str) -> pl.DataFrame:
    con = duckdb.connect()
    con.execute(f"CREATE VIEW manifest AS SELECT * FROM read_parquet('{data}/manifest.parquet')")
    return con.sql(
        f"SELECT m.event_type, m.session, m.timestamp, f.* FROM read_parquet("
        f"'{data}/event_windows/*/*/{kind}.parquet', hive_partitioning = true) f "
        f"JOIN manifest m ON f.event = m.event_id WHERE {where_sql}"
    ).pl()


def best(fn: Callable[[], pl.DataFrame], runs: int) -> tuple[float, pl.DataFrame]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out  # type: ignore[return-value]


def _key(df: pl.DataFrame, kind: str) -> pl.DataFrame:
    """Rows comparable across methods: event id, the row's time, sequence number (sorted)."""
    eid = "event" if "event" in df.columns else "event_id"
    tcol = "ts" if kind == "quotes" else "sip_timestamp"
    cols = pl.col(eid).alias("event_id"), pl.col(tcol).dt.epoch("ns"), "sequence_number"
    return df.select(cols).sort(pl.all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--per-symbol", type=int, default=150)
    ap.add_argument("--types", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--runs-glob", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--generate-only", action="store_true", help="build (and keep) the tree, time nothing")
    ap.add_argument("--resume", action="store_true", help="finish an interrupted generation in --dir")
    ap.add_argument("--workers", type=int, default=2, help="processes that write and compact the tree")
    ap.add_argument("--recompact", action="store_true", help="with --reuse: compact the kept tree again")
    ap.add_argument("--skip-glob", action="store_true", help="time only (c) and (d)")
    ap.add_argument("--query-events", type=int, default=None, metavar="N",
                    help="query 1 takes the type's first N events by time (a start/end range) instead "
                         "of all of them: 10,000 of a type on a tree larger than 100,000 events")
    args = ap.parse_args()
    base = args.dir or ROOT / "benchmarks" / "out" / f"read_{args.events}"
    data, info_file = base / "data", base / "info.json"
    print(f"load average {load_average()}")
    if args.reuse and info_file.is_file():
        info = json.loads(info_file.read_text())
    else:
        if not args.resume:
            shutil.rmtree(base, ignore_errors=True)
        print(f"generating {args.events:,} events under {base}", flush=True)
        info = generate(data, args.events, args.per_symbol, args.types, args.workers)
        info_file.write_text(json.dumps(info))
    if args.reuse and args.recompact:
        info["compact_s"] = compact_all(data, args.workers)
        info_file.write_text(json.dumps(info))
    print(f"tree: {info}")
    if args.generate_only:
        return
    man = pl.read_parquet(data / "manifest.parquet")
    etype, sym = "type_3", man["symbol"][0]
    of_type = man.filter(pl.col("event_type") == etype).sort("timestamp", "event_id")
    q1: dict[str, object] = {"event_types": etype}
    where_sql = f"m.event_type = '{etype}'"
    if args.query_events is not None and args.query_events < of_type.height:
        end = of_type["timestamp"][args.query_events]  # the first N events' times lie before it
        of_type = of_type.filter(pl.col("timestamp") < end)
        q1["end"] = end
        where_sql += f" AND m.timestamp < '{end.isoformat()}'"
    ids = of_type["event_id"].to_list()
    queries = {
        f"quotes of {len(ids):,} events of {etype}": ("quotes", pl.col("event").is_in(ids), where_sql, q1),
        f"trades of {sym} ({(man['symbol'] == sym).sum()} events)": (
            "trades", pl.col("symbol") == sym, f"f.symbol = '{sym}'", {"symbols": sym}),
    }
    rows = []
    for label, (kind, where, where_sql, filters) in queries.items():
        methods: dict[str, tuple[Callable[[], pl.DataFrame], int]] = {
            "(c) load_windows, per-event": (
                lambda k=kind, f=filters: read.load_windows(data, k, use_compacted=False, **f).collect(),
                args.runs),
            "(d) load_windows, compacted": (
                lambda k=kind, f=filters: read.load_windows(data, k, **f).collect(), args.runs),
        }
        if not args.skip_glob:
            methods["(a) polars hive glob"] = (
                lambda k=kind, w=where: glob_polars(data, k, w, man), args.runs_glob)
            methods["(b) DuckDB hive glob"] = (
                lambda k=kind, w=where_sql: glob_duckdb(data, k, w), args.runs_glob)
        got: dict[str, float] = {}
        ref = None
        for name, (fn, runs) in methods.items():
            secs, df = best(fn, runs)
            got[name] = secs
            key = _key(df, kind)
            ref = key if ref is None else ref
            assert key.equals(ref), f"{name}: rows differ from (c) ({key.height} vs {ref.height})"
            print(f"  {label}: {name}: {secs:.3f}s, {df.height:,} rows", flush=True)
        a = got.get("(a) polars hive glob")
        for name in sorted(got):
            rows.append((label, name, f"{got[name]:.3f}", f"{a / got[name]:.1f}x" if a else "-"))
    print(table(["query", "method", "best s", "vs (a)"], rows, title="read_bench"))
    print(f"load average {load_average()}")
    if not args.keep:
        shutil.rmtree(base)


if __name__ == "__main__":
    sys.exit(main())
