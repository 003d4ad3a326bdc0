"""The ingestion report: per-symbol coverage of the manifest on disk, totals, a table and a plot.

No Dagster here (``ops.ingestion_report`` is the asset around it; ``smallcaps-ingest report`` runs it
from a shell). Row counts come from the parquet footers only (``pyarrow.parquet.read_metadata``), never
the data, and are cached in ``_reports/_rowcounts.parquet`` by (size, mtime) of each file, so a report
over a grown tree reads only the footers of new or rewritten files.

Per symbol: ``events`` in the manifest; ``complete``/``partial``/``missing`` of those on disk; ``extra``
events on disk not in the manifest; ``empty`` complete events whose two files both have zero rows;
``trades_rows``/``quotes_rows``/``rows`` over the complete manifest events; ``files``/``bytes`` of every
data file of the symbol on disk; ``coverage`` = complete / events; ``first_event``/``last_event`` the
earliest and latest manifest timestamps.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from smallcaps_ingest import layout, storage
from smallcaps_ingest.core.store import atomic_write_bytes
from smallcaps_ingest.ops.render import format_bytes
from smallcaps_ingest.ops.status import coverage

REPORT_DIR = layout.REPORTS_DIR
REPORT_FILE = "ingestion_report.parquet"
PLOT_FILE = "ingestion_report.png"
ROWCOUNT_CACHE = "_rowcounts.parquet"
TABLE_ROWS = 40  # symbols shown in the markdown table (least complete first)
PLOT_SYMBOLS = 30

TS = pl.Datetime("us", "UTC")
_COUNTS = ("events", "complete", "partial", "missing", "extra", "empty", "unreadable",
           "trades_rows", "quotes_rows", "rows", "files", "bytes")
REPORT_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    **{name: pl.Int64() for name in _COUNTS},
    "coverage": pl.Float64(),
    "first_event": TS,
    "last_event": TS,
}
_CACHE_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "event_id": pl.String(),
    "t_size": pl.Int64(),
    "t_mtime_ns": pl.Int64(),
    "q_size": pl.Int64(),
    "q_mtime_ns": pl.Int64(),
    "trades_rows": pl.Int64(),
    "quotes_rows": pl.Int64(),
}


class ReportError(RuntimeError):
    pass


def reports_dir(data_dir: str | os.PathLike[str]) -> Path:
    return layout.reports_dir(data_dir)  # a UPath on S3


def read_manifest(data_dir: str | os.PathLike[str]) -> pl.DataFrame | None:
    path = layout.manifest_path(data_dir)
    if not storage.isfile(path):
        return None
    return pl.read_parquet(storage.source(path), columns=["symbol", "event_id", "timestamp"])


def _footer_rows(path: str) -> int | None:
    import pyarrow.parquet as pq

    try:
        if not storage.is_remote(path):
            return int(pq.read_metadata(path).num_rows)
        with storage.open_read(path) as fh:  # S3: a ranged GET or two, not the whole object
            return int(pq.read_metadata(fh).num_rows)
    except (OSError, ValueError, Exception):  # noqa: BLE001 - a corrupt footer is counted as unreadable
        return None


def _load_cache(path: Path) -> dict[tuple[str, str], tuple[int, ...]]:
    if not storage.isfile(path):
        return {}
    try:
        df = pl.read_parquet(storage.source(path))
    except Exception:  # noqa: BLE001 - a broken cache is rebuilt
        return {}
    if dict(df.schema) != _CACHE_SCHEMA:
        return {}
    return {(r[0], r[1]): tuple(r[2:]) for r in df.iter_rows()}


def _atomic_parquet(df: pl.DataFrame, dest: Path) -> Path:
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd")
    atomic_write_bytes(buf.getvalue(), dest)
    return dest


def row_counts(
    data_dir: str | os.PathLike[str], scan: layout.TreeScan, *, use_cache: bool = True, threads: int = 8
) -> dict[tuple[str, str], tuple[int | None, int | None]]:
    """(symbol, event) -> (trades rows, quotes rows) for every complete event, from footers (cached)."""
    cache_path = reports_dir(data_dir) / ROWCOUNT_CACHE
    cache = _load_cache(cache_path) if use_cache else {}
    out: dict[tuple[str, str], tuple[int | None, int | None]] = {}
    todo: list[tuple[str, str, tuple[int, int, int, int]]] = []
    for sym, disk in scan.symbols.items():
        for eid, st in (disk.stats or {}).items():
            hit = cache.get((sym, eid))
            if hit is not None and hit[:4] == st:
                out[(sym, eid)] = (hit[4], hit[5])
            else:
                todo.append((sym, eid, st))
    root = layout.WINDOWS_DIR
    trades, quotes = layout.FILES

    def read(item: tuple[str, str, tuple[int, int, int, int]]) -> tuple[int | None, int | None]:
        sym, eid, _ = item
        base = storage.join(
            os.fspath(data_dir), root, f"{layout.SYMBOL_PREFIX}{sym}", f"{layout.EVENT_PREFIX}{eid}"
        )
        return _footer_rows(storage.join(base, trades)), _footer_rows(storage.join(base, quotes))

    if todo:
        with ThreadPoolExecutor(max(1, threads)) as ex:
            for item, rows in zip(todo, ex.map(read, todo), strict=True):
                out[(item[0], item[1])] = rows
    if use_cache and (todo or len(cache) != len(out)):
        keep = [
            (s, e, *scan.symbols[s].stats[e], *out[(s, e)])
            for (s, e) in out  # type: ignore[index]
            if None not in out[(s, e)]
        ]
        frame = pl.DataFrame(keep, schema=_CACHE_SCHEMA, orient="row")
        with contextlib.suppress(OSError):
            _atomic_parquet(frame, cache_path)
    return out


def build_report(
    data_dir: str | os.PathLike[str],
    manifest: pl.DataFrame | None,
    *,
    use_cache: bool = True,
    threads: int = 8,
) -> pl.DataFrame:
    """One row per symbol (manifest symbols, plus symbols found only on disk), sorted by symbol."""
    scan = layout.scan_tree(data_dir, detail=True)
    ids: dict[str, frozenset[str]] = {}
    bounds: dict[str, tuple[Any, Any]] = {}
    if manifest is not None and manifest.height:
        g = manifest.group_by("symbol").agg(
            pl.col("event_id"),
            pl.col("timestamp").min().alias("first"),
            pl.col("timestamp").max().alias("last"),
        )
        for sym, evs, first, last in g.iter_rows():
            ids[sym] = frozenset(evs)
            bounds[sym] = (first, last)
    rows = row_counts(data_dir, scan, use_cache=use_cache, threads=threads)
    cov = coverage(ids if manifest is not None else None, scan)
    records = []
    empty_disk = layout.SymbolDisk()
    for sym, c in cov.items():
        disk = scan.symbols.get(sym, empty_disk)
        counted = disk.complete & ids.get(sym, frozenset()) if manifest is not None else disk.complete
        tr = qr = empty = bad = 0
        for eid in counted:
            t, q = rows.get((sym, eid), (None, None))
            if t is None or q is None:
                bad += 1
                continue
            tr += t
            qr += q
            empty += int(t == 0 and q == 0)
        complete = c.done if manifest is not None else len(disk.complete)
        first, last = bounds.get(sym, (None, None))
        records.append(
            {
                "symbol": sym,
                "events": c.events,
                "complete": complete,
                "partial": c.partial if manifest is not None else len(disk.partial),
                "missing": c.missing,
                "extra": c.extra if manifest is not None else 0,
                "empty": empty,
                "unreadable": bad,
                "trades_rows": tr,
                "quotes_rows": qr,
                "rows": tr + qr,
                "files": c.files,
                "bytes": c.bytes,
                "coverage": (complete / c.events) if c.events else None,
                "first_event": first,
                "last_event": last,
            }
        )
    return pl.DataFrame(records, schema=REPORT_SCHEMA).sort("symbol")


def report_totals(df: pl.DataFrame) -> dict[str, Any]:
    s = {
        c: int(df[c].sum())
        for c in (
            "events",
            "complete",
            "partial",
            "missing",
            "extra",
            "empty",
            "unreadable",
            "trades_rows",
            "quotes_rows",
            "rows",
            "files",
            "bytes",
        )
    }
    with_events = df.filter(pl.col("events") > 0)
    s["symbols"] = with_events.height
    s["symbols_complete"] = with_events.filter(pl.col("complete") == pl.col("events")).height
    s["symbols_on_disk_only"] = df.height - with_events.height
    s["coverage_pct"] = round(100.0 * s["complete"] / s["events"], 3) if s["events"] else None
    first, last = df["first_event"].min(), df["last_event"].max()
    s["first_event"] = first.isoformat() if isinstance(first, datetime) else None
    s["last_event"] = last.isoformat() if isinstance(last, datetime) else None
    return s


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1%}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M")
    return str(v)


def markdown_table(df: pl.DataFrame, totals: dict[str, Any], max_rows: int = TABLE_ROWS) -> str:
    cols = [
        "symbol",
        "events",
        "complete",
        "partial",
        "missing",
        "empty",
        "rows",
        "bytes",
        "coverage",
        "first_event",
        "last_event",
    ]
    head = "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    t = totals
    total_row = (
        f"| **total ({t['symbols']} symbols, {t['symbols_complete']} complete)** | {t['events']:,} | "
        f"{t['complete']:,} | {t['partial']:,} | {t['missing']:,} | {t['empty']:,} | {t['rows']:,} | "
        f"{format_bytes(t['bytes'])} | "
        f"{'' if t['coverage_pct'] is None else format(t['coverage_pct'], '.1f') + '%'} | "
        f"{(t['first_event'] or '')[:16].replace('T', ' ')} | "
        f"{(t['last_event'] or '')[:16].replace('T', ' ')} |\n"
    )
    shown = df.sort(pl.col("coverage").fill_null(2.0), -pl.col("events"), "symbol").head(max_rows)
    body = ""
    for r in shown.iter_rows(named=True):
        r = dict(r)
        r["bytes"] = format_bytes(r["bytes"])
        body += "| " + " | ".join(_fmt(r[c]) for c in cols) + " |\n"
    note = ""
    if df.height > max_rows:
        note = (
            f"\n{max_rows} least complete of {df.height} symbols shown; "
            f"all in `{REPORT_DIR}/{REPORT_FILE}`.\n"
        )
    return head + total_row + body + note


def plot_report(
    df: pl.DataFrame,
    totals: dict[str, Any],
    throughput: Sequence[tuple[float, int, float]] | None,
    path: str | os.PathLike[str],
) -> Path:
    """PNG: coverage of the least complete symbols, and events written over time (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=80)
    FigureCanvasAgg(fig)  # the Agg canvas, explicitly: no pyplot, no global backend switch
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    shown = (
        df.filter(pl.col("events") > 0)
        .sort(pl.col("coverage"), -pl.col("events"), "symbol")
        .head(PLOT_SYMBOLS)
    )
    shown = shown.reverse()  # least complete on top
    y = list(range(shown.height))
    c, p, m = shown["complete"].to_list(), shown["partial"].to_list(), shown["missing"].to_list()
    ax1.barh(y, c, color="#2e7d32", label="complete")
    ax1.barh(y, p, left=c, color="#f9a825", label="partial")
    ax1.barh(y, m, left=[a + b for a, b in zip(c, p, strict=True)], color="#c62828", label="missing")
    ax1.set_yticks(y, shown["symbol"].to_list(), fontsize=7)
    ax1.set_xlabel("events")
    cov = totals.get("coverage_pct")
    ax1.set_title(
        f"coverage {'' if cov is None else f'{cov:.1f}% '}of {totals['events']:,} events "
        f"({totals['symbols_complete']}/{totals['symbols']} symbols complete)",
        fontsize=9,
    )
    if shown.height:
        ax1.legend(fontsize=7, loc="lower right")
    pts = sorted(throughput or [])
    if pts:
        # the step line starts at 0 when the earliest work began (timestamp - seconds of that run)
        start = min(t - secs for t, _, secs in pts)
        times = [datetime.fromtimestamp(start, UTC)] + [datetime.fromtimestamp(t, UTC) for t, _, _ in pts]
        cum, acc = [0], 0
        for _, w, _ in pts:
            acc += w
            cum.append(acc)
        ax2.step(times, cum, where="post", color="#1565c0")
        ax2.set_ylabel("events written (cumulative)")
        span = (pts[-1][0] - start) / 60
        rate = f", {acc / span:,.0f} events/min incl. idle time" if span > 0 else ""
        ax2.set_title(f"throughput: {acc:,} events in {len(pts)} materializations{rate}", fontsize=9)
        ax2.tick_params(axis="x", labelrotation=30, labelsize=7)
    else:
        ax2.text(0.5, 0.5, "no event_windows materialization yet", ha="center", va="center")
        ax2.set_axis_off()
    fig.tight_layout()
    out = storage.to_path(path)
    if not storage.is_remote(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(buf.getvalue(), out)
    return out


def png_data_uri(path: str | os.PathLike[str]) -> str:
    return "data:image/png;base64," + base64.b64encode(storage.read_bytes(path)).decode("ascii")


@dataclass(frozen=True)
class ReportOutput:
    frame: pl.DataFrame
    totals: dict[str, Any]
    parquet: Path
    plot: Path
    markdown_table: str

    def markdown(self, embed_plot: bool = True) -> str:
        img = f"![coverage and throughput]({png_data_uri(self.plot)})\n\n" if embed_plot else ""
        return img + self.markdown_table


def run_report(
    data_dir: str | os.PathLike[str],
    manifest: pl.DataFrame | None = None,
    throughput: Sequence[tuple[float, int, float]] | None = None,
    *,
    use_cache: bool = True,
) -> ReportOutput:
    """Build, write ``_reports/ingestion_report.parquet`` and ``.png``; ``manifest`` defaults to the file."""
    if manifest is None:
        manifest = read_manifest(data_dir)
    if manifest is None:
        raise ReportError(
            f"no manifest at {layout.manifest_path(data_dir)}: materialize the manifest asset first"
        )
    df = build_report(data_dir, manifest, use_cache=use_cache)
    totals = report_totals(df)
    parquet = _atomic_parquet(df, reports_dir(data_dir) / REPORT_FILE)
    plot = plot_report(df, totals, throughput, reports_dir(data_dir) / PLOT_FILE)
    return ReportOutput(df, totals, parquet, plot, markdown_table(df, totals))
